"""``remat fit``: a model's whole training step fitted to a device memory, from the command line.

The step trains the model's chain (a reference chain or the user's, loaded by
``cli_model.load_model``) with Adam, parameters and optimizer state donated:
``remat.fit(step, memory)`` plans the chain as ``segmenters.auto()``. Then the
largest batch (and, where the model takes ``--seq-len``, the largest sequence
length) that fits is searched, for ``remat.fit`` and for plain backprop.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from remat._src.core import compile as compile_lib
from remat._src.fitting import fit as fit_lib
from remat._src.measure import profile as profile_lib
from remat._src.chains import sequential as seq_lib
from remat._src.cli.cli_util import make_progress, markdown_table
from remat._src.cli.cli_model import ChainModel, ModelError, load_model
from remat._src.util.units import format_bytes

_MAX_SEARCH = 1 << 16  # the largest batch or length the search tries
_clock = time.monotonic  # the search's clock (tests replace it)


def adam_step(model: ChainModel, segmenter: Any) -> Callable:
  """``step(params, (m, v), x, key) -> (params, (m, v), loss)``: Adam on the chain's mean-square output."""
  apply = seq_lib.sequential(model.layers, segmenter)

  def step(params, moments, x, key):
    loss, g = jax.value_and_grad(lambda p: jnp.mean(jnp.square(apply(p, x, key).astype(jnp.float32))))(params)
    m, v = moments
    m = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
    v = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
    params = jax.tree_util.tree_map(lambda p, m, v: p - 1e-3 * m / (jnp.sqrt(v) + 1e-8), params, m, v)
    return params, (m, v), loss

  return step


def step_args(model: ChainModel) -> tuple:
  params, x, key = model.specs()
  return params, (params, params), x, key


def fit_report(model: ChainModel, memory: int, max_compiles: int = 12) -> fit_lib.FitReport:
  """``remat.fit`` of the model's step (raises ``ValueError`` where nothing fits)."""
  return fit_lib.fit(adam_step(model, fit_lib.auto()), memory, max_compiles=max_compiles,
                     donate_argnums=(0, 1)).plans(*step_args(model))


def fits(model: ChainModel, memory: int) -> bool:
  """Whether any plan fits: the plain step, then the smallest-memory plans (at most 4 compiles; the
  search for the cheapest plan that fits is left to the final report)."""
  try:
    fit_report(model, memory, max_compiles=4)
    return True
  except ValueError:
    return False


def plain_peak(model: ChainModel) -> int:
  step = compile_lib.jit(adam_step(model, seq_lib.plain_plan(model.depth)), donate_argnums=(0, 1))
  return profile_lib.profile(step, *step_args(model)).peak_bytes


class OutOfTime(Exception):
  """The search's time (``--max-time``) ran out before the next probe."""


class Largest:
  """The largest ``n >= 1`` with ``fits(n)``: doubling from ``start``, then bisection.

  ``lo`` is the largest size seen to fit (0: none yet), ``hi`` the smallest
  seen not to fit (``None``: none yet); when the search is stopped (time,
  Ctrl-C) they are what it has found.
  """

  def __init__(self, fits: Callable[[int], bool], start: int):
    self.fits, self.start = fits, max(start, 1)
    self.lo, self.hi = 0, None

  def probe(self, n: int) -> bool:
    ok = self.fits(n)
    if ok:
      self.lo = max(self.lo, n)
    else:
      self.hi = n if self.hi is None else min(self.hi, n)
    return ok

  def run(self) -> int:
    n = self.start
    while n <= _MAX_SEARCH and self.probe(n):
      n *= 2
    if self.lo == 0:
      while n > 1 and not self.probe(n // 2):
        n //= 2
      if self.lo == 0:
        return 0
    while self.hi is not None and self.hi - self.lo > 1:
      self.probe((self.lo + self.hi) // 2)
    return self.lo

  def found(self) -> str:
    """What is known, for a search that was stopped."""
    if self.hi is not None and self.hi - self.lo <= 1:
      return str(self.lo)
    if self.hi is None and not self.lo:
      return "not searched (stopped)"
    upper = f", {self.hi} does not" if self.hi is not None else ""
    return f">= {self.lo} (stopped{upper})" if self.lo else f"none found (stopped{upper})"


def largest(fits: Callable[[int], bool], start: int) -> int:
  """The largest ``n >= 1`` with ``fits(n)`` (0 if none): doubling from ``start``, then bisection."""
  return Largest(fits, start).run()


def cmd_fit(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
  sizes = {k: getattr(args, k) for k in ("depth", "width", "batch", "seq_len", "heads")}

  def load(**override):
    try:
      return load_model(args.model, **{**sizes, **override})
    except ModelError as e:
      if override:
        raise
      value = args.model if e.flag == "--model" else getattr(args, e.flag[2:].replace("-", "_"))
      ap.error(f"argument {e.flag} {value}: {e}")

  memory = args.memory
  model = load()
  bar = make_progress(12, not args.no_progress)  # one step per compile of the search (at most 12)
  bar.set_description(f"fitting to {format_bytes(memory)}")
  logger, handler = logging.getLogger("remat"), _CompileProgress(bar)
  level = logger.level
  logger.setLevel(logging.INFO)
  logger.addHandler(handler)
  try:
    report, failure = fit_report(model, memory), None
  except ValueError as e:
    report, failure = None, e
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  bar.close()
  print(f"\n{model.description} on {jax.default_backend()}; memory {format_bytes(memory)} per device "
        "(parameters, Adam state, batch, gradients and activations)\n")
  if report is None:
    print(f"does not fit: {failure}")
  else:
    plan, p, q = report.plans[0], report.profile, report.plain_profile
    print(f"Plan: {plan.forward_evaluations} layer forward evaluations ({plan.recomputation()}), "
          f"chosen in {report.compiles} compile(s) of the step")
    print("\n".join(plan.root.lines(1)))
    print()
    rows = [[name, format_bytes(r.peak_bytes), format_bytes(r.temp_bytes), f"{r.flops / 1e9:,.3f}",
             "yes" if r.peak_bytes <= memory else "no"]
            for name, r in (("plain backprop", q), ("remat.fit", p))]
    print(markdown_table(["step", "compiled peak", "of which temporaries", "GFLOP", "fits"], rows))
  if args.no_search:
    return 0 if report is not None else 1
  print()
  return _search_sizes(args, model, memory, load, report is not None)


class _CompileProgress(logging.Handler):
  """Advances the progress bar as each compile of remat.fit's search ends (the 'remat' logger)."""

  def __init__(self, bar):
    super().__init__(logging.INFO)
    self.bar = bar

  def emit(self, record: logging.LogRecord) -> None:
    msg = record.getMessage()
    if msg.startswith("`remat.fit`: compile ") and ": peak " in msg:
      self.bar.set_description(msg[len("`remat.fit`: "):].split(": peak ")[0][:60])
      self.bar.update(1)


def _search_sizes(args, model, memory, load, fitted: bool) -> int:
  """The largest batch and sequence length that fit, plain and with remat.fit, within --max-time.

  Each probe prints a line as it finishes; when the time runs out or the user
  presses Ctrl-C, what was found so far is printed (exit status 124 or 130).
  """
  start_time = _clock()
  deadline = start_time + args.max_time
  searches: list[tuple[str, Largest, Largest]] = []
  status = 0 if fitted else 1
  print(f"Searching the largest sizes that fit (at most {args.max_time:g} s; Ctrl-C stops and "
        "prints what was found):", flush=True)
  try:
    for flag, name in (("--batch", "batch"), ("--seq-len", "seq_len")):
      start = getattr(args, name) or _default(model, name)
      if start is None:
        continue
      try:
        load(**{name: start})
      except ModelError:
        print(f"(the model does not take {flag}: no search over it)")
        continue

      def probe(label, answer, name=name):
        def run(n):
          if _clock() > deadline:
            raise OutOfTime
          ok = answer(load(**{name: n}))
          print(f"  {label} at {name} {n}: {'fits' if ok else 'does not fit'} "
                f"({_clock() - start_time:.0f} s)", flush=True)
          return ok
        return run

      plain = Largest(probe("plain backprop", lambda m: plain_peak(m) <= memory), start)
      fitted_search = Largest(probe("remat.fit", lambda m: fits(m, memory)), start)
      searches.append((flag, plain, fitted_search))
      fitted_search.start = max(plain.run(), 1)
      fitted_search.run()
  except OutOfTime:
    print(f"(--max-time {args.max_time:g} s reached: the search stopped; raise --max-time to go on)")
    status = 124
  except KeyboardInterrupt:
    print("(interrupted: what the search found so far)")
    status = 130
  rows = []
  for flag, plain, fitted_search in searches:
    done = status in (0, 1) or (plain.hi is not None and fitted_search.hi is not None)
    ratio = (f"{fitted_search.lo / plain.lo:.1f}x" if done and plain.lo else "n/a")
    rows.append([f"largest {flag[2:]}", plain.found(), fitted_search.found(), ratio])
  if rows:
    print(markdown_table(["at the other sizes given", "plain backprop", "remat.fit", "remat.fit / plain"],
                         rows))
  return status


def _default(model: ChainModel, name: str) -> int | None:
  x = jax.tree_util.tree_leaves(model.x)[0]
  if name == "batch":
    return int(x.shape[0])
  return int(x.shape[1]) if x.ndim >= 3 else None
