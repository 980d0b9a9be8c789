"""The README's code examples run as written."""

import pathlib
import re

import pytest

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_examples_and_the_two_commands():
  assert len(BLOCKS) >= 2
  assert "experiments/tradeoff.py --quick" in README and "pytest" in README


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
  exec(compile(BLOCKS[i], f"README block {i}", "exec"), {})
