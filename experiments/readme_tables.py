"""Regenerates the README's measured founding table from the CSV of the main job, so that they agree.

The README's table (between the ``tradeoff-table`` markers) is ``remat_bench.tradeoff.founding_table``
of ``docs/tradeoff_quick.csv``, which ``experiments/tradeoff.py --quick --out DIR`` wrote
(``DIR/tradeoff.csv``, copied there). ``tests/test_readme.py`` checks that the README block is exactly
that, and, on the jax the CSV was made with, that a fresh compile gives the CSV's memory, flops and
forward evaluations.

  python experiments/readme_tables.py                      # rewrite the README block from the CSV
  python experiments/readme_tables.py --csv results/tradeoff.csv --save   # from a new run, kept
  python experiments/readme_tables.py --check              # exit 1 if the README has drifted
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

from remat_bench import chains, tradeoff

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CSV = ROOT / "docs" / "tradeoff_quick.csv"
BEGIN, END = "<!-- tradeoff-table:begin -->", "<!-- tradeoff-table:end -->"
# The chain of `experiments/tradeoff.py --quick` (its defaults): one activation = batch x width floats.
QUICK = dict(model="mlp", width=256, batch=512)


def table(csv_path: pathlib.Path = CSV) -> str:
  """The README block: the founding table of the CSV, as the main job prints it."""
  rows = tradeoff.read_csv(str(csv_path))
  act = chains.Chain(depth=4, **QUICK).activation_bytes
  text = tradeoff.founding_table(rows, act)
  return text.split("\n\n", 1)[1].strip()  # the table without its one-line caption


def readme_block(readme: str) -> str:
  start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
  return readme[start:stop].strip()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--csv", type=pathlib.Path, default=CSV, help="tradeoff.csv of a --quick run")
  ap.add_argument("--save", action="store_true", help=f"copy --csv to {CSV.relative_to(ROOT)} too")
  ap.add_argument("--check", action="store_true", help="only compare; exit 1 if the README differs")
  args = ap.parse_args(argv)
  text = README.read_text()
  new = table(args.csv)
  if args.check:
    same = readme_block(text) == new
    print("README table matches the CSV" if same else "README table differs from the CSV:\n" + new)
    return 0 if same else 1
  if args.save and args.csv.resolve() != CSV.resolve():
    shutil.copyfile(args.csv, CSV)
  start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
  README.write_text(text[:start] + "\n" + new + "\n" + text[stop:])
  print(f"wrote the table of {args.csv} into {README.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
