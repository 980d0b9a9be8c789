"""Executing a :class:`Plan`: nested checkpoints, keys tied to inputs, scanned levels.

The one place that turns plan data into a program. :func:`build` walks a
segment tree once for every caller: ``remat.sequential`` runs pure layer
functions with per-layer keys, ``remat.nnx.Sequential`` runs modules through
``remat.nnx.checkpoint``; both give it a way to run one layer and a way to
checkpoint a segment's function. Planning never imports this module.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from remat._src.core import offload as offload_lib
from remat._src.core import policies
from remat._src.core import rng as rng_lib
from remat._src.core import barrier as barrier_lib
from remat._src.core import transform
from remat._src.plans.plan import Levels, Plan, Segment
from remat._src.util.signature import layer_callers

# A checkpointed segment's function is ``fn(items, x)``: offloading its stored
# input moves argument 1 (never the parameters or modules in ``items``).
OFFLOAD_INPUT = offload_lib.host(argnums=1, min_bytes=0)


### The plan walker


def build(seg: Segment, run_layer: Callable[[int, Any, Any], Any],
          checkpoint: Callable[..., Callable]) -> Callable:
  """The function ``run(items, x) -> y`` of segment ``seg``.

  Args:
    seg: a segment of a plan.
    run_layer: ``run_layer(i, item, x) -> y`` runs layer ``i`` on ``x`` with
      its ``item`` (parameters and key, a module ...).
    checkpoint: ``checkpoint(fn, offload, policy=None) -> fn`` wraps a
      checkpointed segment's ``fn(items, x)``; ``offload`` says whether its
      stored input ``x`` lives in host memory. A taped layer with a policy is
      wrapped alone (``items`` of length one) with that policy.

  Returns:
    ``run(items, x)``, where ``items`` holds one entry per layer of ``seg``.
  """
  if seg.children:
    parts = [(c.start - seg.start, c.stop - seg.start, build(c, run_layer, checkpoint))
             for c in seg.children]

    def run(items, x):
      for a, b, f in parts:
        x = f(items[a:b], x)
      return x
  elif seg.policy is None:
    def run(items, x):
      for i in range(seg.start, seg.stop):
        x = run_layer(i, items[i - seg.start], x)
      return x
  else:  # each layer taped under the policy: it keeps what the policy saves, recomputes the rest
    wrapped = [checkpoint(functools.partial(_one_layer, run_layer, i), False, seg.policy)
               for i in range(seg.start, seg.stop)]

    def run(items, x):
      for j, f in enumerate(wrapped):
        x = f(items[j:j + 1], x)
      return x
  run.__name__ = f"segment_{seg.start}_{seg.stop}"
  return checkpoint(run, seg.offload) if seg.checkpoint else run


def _one_layer(run_layer, i, items, x):
  return run_layer(i, items[0], x)


def checkpoint_segment(fn: Callable, offload: bool, policy: str | None = None) -> Callable:
  """``remat.checkpoint`` of a segment's ``fn(items, x)``: its input offloaded, or a policy, if asked."""
  return transform.checkpoint(fn, offload=OFFLOAD_INPUT if offload else None,
                              policy=None if policy is None else policies.policy_of(policy))


### Pure layer functions


def call_tied(f: Callable, p: Any, x: Any, key: Any) -> Any:
  """``f(p, x, key)`` with the key made available only together with ``x`` (``barrier.tie_keys``)."""
  if jax.tree_util.tree_leaves(key):
    key, x = barrier_lib.tie_keys((key, x))
  return f(p, x, key)


def apply_plan(plan: Plan, layers: Sequence[Callable], params: Sequence[Any], x: Any,
               key: Any = None) -> Any:
  """Runs ``layers`` under ``plan``; layer ``i`` gets ``remat.rng.layer_key(key, i)``."""
  if len(layers) != plan.num_layers or len(params) != plan.num_layers:
    raise ValueError(
        f"the plan is for {plan.num_layers} layers, but got {len(layers)} layers and "
        f"{len(params)} parameter entries. Make a plan for this chain.")
  callers = layer_callers(layers)
  items = tuple((p, rng_lib.layer_key(key, i)) for i, p in enumerate(params))
  run_layer = lambda i, item, x: call_tied(callers[i], item[0], x, item[1])  # noqa: E731
  return build(plan.root, run_layer, checkpoint_segment)(items, x)


### Scanned levels (parameters stacked on a leading axis)

def layer_policy(plan: Plan) -> Any:
  """The jax checkpoint policy every taped layer of a regular ``plan`` uses (``None``: tape all)."""
  names = plan.layer_policies
  return policies.policy_of(names[0]) if names and names[0] is not None else None


def scan_levels(caller: Callable, levels: Levels, params: Any, x: Any, keys: Any, *,
                outputs: bool = False, policy: Any = None) -> Any:
  """Nested ``lax.scan``: level ``(count, ck)`` scans ``count`` sub-stacks, checkpointing each if ``ck``.

  Args:
    caller: ``caller(p, x, key)`` runs one layer (its key tied to ``x``, see
      :func:`call_tied`); with ``outputs=True`` it returns ``(y, out)``.
    levels: from :func:`regular_levels`; the counts multiply to the depth.
    params: parameters stacked on axis 0 (the depth).
    x: the stack's input.
    keys: per-layer keys (or any per-layer inputs) stacked on axis 0, or ``None``.
    outputs: ``caller`` returns ``(y, out)``; the ``out`` of every layer come
      back stacked on axis 0 (e.g. state a layer updates).
    policy: a ``jax.checkpoint_policies`` policy for every taped layer
      (``remat.checkpoint(policy=...)`` around each), or ``None``.

  Returns:
    The stack's output, or ``(output, outs)`` with ``outputs=True``.

  A level of one sub-stack is not a loop, and a level of single layers scans
  the parameters as they are: reshaping the stack to ``(depth, 1, ...)`` made
  XLA keep a copy of the whole stacked parameter gradient (measured: +1 MiB of
  temp per 512x512 layer, with ``jax.checkpoint`` as with ours).
  """
  def one(p, x, k):
    return call_tied(caller, p, x, k)

  if policy is not None:
    one = transform.checkpoint(one, policy=policy)
  run, stacked = _level_fn(one, [(int(c), bool(ck)) for c, ck in levels], outputs)
  if stacked:
    return run(params, x, keys)
  first = lambda a: a[0]  # noqa: E731 - a one-layer stack
  out = run(jax.tree_util.tree_map(first, params), x, jax.tree_util.tree_map(first, keys))
  if outputs:
    return out[0], jax.tree_util.tree_map(lambda a: a[None], out[1])
  return out


def _level_fn(one: Callable, levels: Levels, outputs: bool) -> tuple[Callable, bool]:
  """``(run(p, x, k), stacked)``: ``run`` over the sub-stack of ``levels``, ``p`` stacked or one layer's."""
  if all(c == 1 for c, _ in levels):  # a single layer, maybe checkpointed
    fn = one
    for _, ck in reversed(levels):
      fn = transform.checkpoint(fn) if ck else fn
    return fn, False
  (count, ck), rest = levels[0], levels[1:]
  inner, inner_stacked = _level_fn(one, rest, outputs) if rest else (one, False)
  if ck:
    inner = transform.checkpoint(inner)
  if count == 1:
    return inner, inner_stacked
  per = math.prod(c for c, _ in rest)

  def body(x, pk):
    out = inner(pk[0], x, pk[1])
    return out if outputs else (out, None)

  def run(p, x, k):
    xs = (p, k)
    if inner_stacked:
      xs = jax.tree_util.tree_map(lambda a: a.reshape((count, per) + a.shape[1:]), xs)
    y, ys = jax.lax.scan(body, x, xs)
    if not outputs:
      return y
    if inner_stacked:
      ys = jax.tree_util.tree_map(lambda a: a.reshape((count * per,) + a.shape[2:]), ys)
    return y, ys

  return run, True


def stacked_keys(key: Any, n: int) -> Any:
  """``remat.rng.layer_key(key, i)`` for ``i < n``, stacked on a leading axis (``None`` stays)."""
  if key is None:
    return None
  return jax.vmap(lambda i: rng_lib.layer_key(key, i))(jnp.arange(n))
