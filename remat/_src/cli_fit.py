"""``remat fit``: a model's whole training step fitted to a device memory, from the command line.

The step trains the model's chain (a reference chain or the user's, loaded by
``cli_model.load_model``) with Adam, parameters and optimizer state donated:
``remat.fit(step, memory)`` plans the chain as ``segmenters.auto()``. Then the
largest batch (and, where the model takes ``--seq-len``, the largest sequence
length) that fits is searched, for ``remat.fit`` and for plain backprop.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from remat._src import compile as compile_lib
from remat._src import fit as fit_lib
from remat._src import profile as profile_lib
from remat._src import sequential as seq_lib
from remat._src.cli import make_progress, markdown_table
from remat._src.cli_model import ChainModel, ModelError, load_model
from remat._src.units import format_bytes

_MAX_SEARCH = 1 << 16  # the largest batch or length the search tries


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


def fit_report(model: ChainModel, memory: int) -> fit_lib.FitReport:
  """``remat.fit`` of the model's step (raises ``ValueError`` where nothing fits)."""
  return fit_lib.fit(adam_step(model, fit_lib.auto()), memory, donate_argnums=(0, 1)).plans(
      *step_args(model))


def fits(model: ChainModel, memory: int) -> bool:
  try:
    fit_report(model, memory)
    return True
  except ValueError:
    return False


def plain_peak(model: ChainModel) -> int:
  step = compile_lib.jit(adam_step(model, seq_lib.plain_plan(model.depth)), donate_argnums=(0, 1))
  return profile_lib.profile(step, *step_args(model)).peak_bytes


def largest(fits: Callable[[int], bool], start: int) -> int:
  """The largest ``n >= 1`` with ``fits(n)`` (0 if none): doubling from ``start``, then bisection."""
  lo, hi = 0, max(start, 1)
  while hi <= _MAX_SEARCH and fits(hi):
    lo, hi = hi, hi * 2
  if lo == 0:
    hi = max(start, 1)
    while hi > 1 and not fits(hi // 2):
      hi //= 2
    if hi == 1:
      return 0
    lo = hi // 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


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
  log = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True))
  bar = make_progress(1, not args.no_progress)
  bar.set_description(f"fitting to {format_bytes(memory)}")
  try:
    report, failure = fit_report(model, memory), None
  except ValueError as e:
    report, failure = None, e
  bar.update(1)
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
  rows = []
  for flag, name in (("--batch", "batch"), ("--seq-len", "seq_len")):
    start = getattr(args, name) or _default(model, name)
    if start is None:
      continue
    try:
      load(**{name: start})
    except ModelError:
      print(f"(the model does not take {flag}: no search over it)")
      continue

    def fits_fit(n, name=name):
      log(f"  remat.fit at {name} {n}")
      return fits(load(**{name: n}), memory)

    def fits_plain(n, name=name):
      log(f"  plain backprop at {name} {n}")
      return plain_peak(load(**{name: n})) <= memory

    plain_max = largest(fits_plain, start)
    fit_max = largest(fits_fit, max(plain_max, 1))
    ratio = f"{fit_max / plain_max:.1f}x" if plain_max else "n/a"
    rows.append([f"largest {flag[2:]}", plain_max, fit_max, ratio])
  if rows:
    print(markdown_table(["at the other sizes given", "plain backprop", "remat.fit", "remat.fit / plain"],
                         rows))
  return 0 if report is not None else 1


def _default(model: ChainModel, name: str) -> int | None:
  x = jax.tree_util.tree_leaves(model.x)[0]
  if name == "batch":
    return int(x.shape[0])
  return int(x.shape[1]) if x.ndim >= 3 else None
