"""``python -m remat``: see ``remat --help``."""

import sys

from remat._src.cli.cli import main


def _run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  _run()
