"""Shared helpers for the experiments: timing, environment record, table printing."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Sequence

import jax


def environment() -> dict[str, str]:
  """Backend and device kind, recorded in every results file."""
  d = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device_kind": getattr(d, "device_kind", str(d)),
      "device_count": str(jax.device_count()),
      "jax": jax.__version__,
      "python": platform.python_version(),
  }


def interleaved_medians(fns: dict[str, Callable[[], object]], *, rounds: int = 10,
                        warmup: int = 2) -> dict[str, float]:
  """Median wall time (seconds) of each thunk, run round-robin so noise hits all alike."""
  for _ in range(warmup):
    for f in fns.values():
      jax.block_until_ready(f())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """Prints (and returns) a GitHub-markdown table."""
  cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  text = "\n".join(lines)
  print(text)
  return text


def _fmt(c: object) -> str:
  if isinstance(c, float):
    return f"{c:.3g}" if abs(c) < 1000 else f"{c:,.0f}"
  return str(c)


def mib(b: float) -> str:
  return f"{b / 2**20:,.1f} MiB"
