"""What every ``remat`` command shares: one-line argument errors, argument types, tables, progress
bars, and the benchmark package. The command modules import this; it imports none of them.

Imports run one way: ``cli`` (the entry point) -> ``cli_fit`` -> ``cli_model`` -> ``cli_util``.
"""

from __future__ import annotations

import argparse
import importlib
import math

from remat._src.util.units import parse_bytes

### Arguments


class OneLineParser(argparse.ArgumentParser):
  """``argparse`` whose errors are one line, ``prog: error: message``, with exit status 2."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(flag: str, example: str, *, zero: bool = False):
  """An argparse ``type`` for a whole number >= 1 (>= 0 with ``zero``), with a message naming ``flag``."""
  least = 0 if zero else 1

  def parse(text: str) -> int:
    try:
      v = int(text)
    except ValueError:
      v = None
    if v is None or v < least:
      raise argparse.ArgumentTypeError(
          f"expected a whole number >= {least}, but got {text!r}; e.g. {flag} {example}.")
    return v

  parse.__name__ = "int"
  return parse


def positive_number(flag: str, example: str):
  """An argparse ``type`` for a finite number > 0, with a message naming ``flag``."""

  def parse(text: str) -> float:
    try:
      v = float(text)
    except ValueError:
      v = None
    if v is None or not math.isfinite(v) or v <= 0:
      raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, but got {text!r}; e.g. "
                                       f"{flag} {example}.")
    return v

  parse.__name__ = "float"
  return parse


def nearest_divisor(n: int, k: int) -> int:
  """The divisor of ``n`` nearest ``k`` (the larger on a tie): a suggestion for ``--heads``."""
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), -d))


def size_arg(text: str) -> int:
  """An argparse ``type`` for a size in bytes (``2GiB``, ``512MiB``, ``1e9``)."""
  try:
    return parse_bytes(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


### Output


def markdown_table(header, rows) -> str:
  """A Markdown table with padded columns."""
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


class _PlainProgress:
  def __init__(self, total):
    self.n, self.total = 0, total

  def set_description(self, s):
    print(f"[{min(self.n + 1, self.total)}/{self.total}] {s}", flush=True)

  def update(self, k):
    self.n += k

  def close(self):
    pass


def make_progress(total: int, enabled: bool = True):
  """A tqdm bar where available (and wanted), else one printed line per step, ``[k/total]``."""
  if enabled:
    try:
      from tqdm.auto import tqdm

      return tqdm(total=total, unit="step", leave=True)
    except ImportError:
      pass
  return _PlainProgress(total)


### The benchmark package


def bench_module(module: str):
  """A module of the repository's benchmark package, which the remat wheel does not ship."""
  try:
    return importlib.import_module(f"remat_bench.{module}")
  except ImportError as e:
    raise SystemExit(
        f"remat: error: the reference models and the trade-off measurement live in the repository's "
        f"benchmark package `remat_bench`, which is not installed ({e}). From a clone of remat: "
        "`pip install -e . -e bench`; or plan your own model with --model path/to/file.py:factory.") from None
