"""``remat.sequential``: a chain of layer functions run under a plan or a segmenter.

Plans are made at trace time from the traced shapes: one ``apply`` with a
``budget`` segmenter plans separately for every sequence length it sees, and
recomputes nothing where plain backprop fits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from remat._src import costs as costs_lib
from remat._src import plan as plan_lib
from remat._src import profile as profile_lib
from remat._src import segmenters as seg_lib
from remat._src import transform

_API = "`remat.sequential`"
_PLANS: dict[Any, plan_lib.Plan] = {}
_SLACK = 0.005  # fraction of a budget left free for the caller's step beyond the reference step


### Main API


def sequential(layers: Sequence[Callable] | Callable, plan_or_segmenter: Any) -> Callable:
  """Applies a chain of layers under a checkpointing plan (or a segmenter that makes one).

  Homogeneous stacks: pass a single ``layer`` function instead of a list, and
  parameters stacked on a leading axis (as for ``lax.scan``). The segmenter
  plans for that many layers; a regular plan (``every(k)`` with ``k``
  dividing the depth, ``sqrt()``, ``multilevel(levels)`` on suitable depths)
  runs as nested ``lax.scan``s with checkpointed bodies, like
  ``nn.remat_scan`` but planned; an irregular one (``revolve``, ``none``,
  ``budget``, non-dividing sizes) runs unrolled over slices of the stack. In a
  scan every iteration is the same program, so the forward of a trailing
  checkpointed sub-segment in a recomputation is kept: a scanned plan may make
  a few more forward evaluations than ``Plan.forward_evaluations`` says. An
  unrolled stack slices its parameters, and XLA then holds the stacked
  gradient (depth x one layer's parameter bytes) as temp memory, which a
  ``budget`` plan (verified on the per-layer chain) does not include.

  Args:
    layers: the chain: functions ``layer(p, x) -> y`` or ``layer(p, x, key) -> y``
      (layers taking a key get ``remat.rng.layer_key(key, i)``, the same key in
      the recomputation, so dropout is exact), or one such function for a
      stack with stacked parameters.
    plan_or_segmenter: a ``remat.Plan`` for ``len(layers)`` layers, or a
      segmenter from ``remat.segmenters`` (``every(4)``, ``revolve(3)``,
      ``budget(2**30)`` ...). A segmenter plans at trace time for the traced
      shapes; ``budget`` measures the layers with XLA and checks its plan by
      compiling it (cached per shape).

  Returns:
    ``apply(params, x, key=None)`` where ``params`` has one entry per layer.
    ``apply.plan_for(params, x, key=None)`` returns the plan it would use for
    these shapes (arrays or ``jax.ShapeDtypeStruct``).

  Raises:
    TypeError: if ``layers`` holds a non-callable, or ``plan_or_segmenter``
      is neither a plan nor a segmenter.
    ValueError: if a plan is for another number of layers, or ``layers`` is empty.

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> layer = lambda w, x: jnp.tanh(x @ w)
    >>> apply = remat.sequential([layer] * 8, remat.segmenters.revolve(2))
    >>> ws, x = [jnp.eye(4) * 0.5] * 8, jnp.ones((2, 4))
    >>> g = jax.grad(lambda ws: apply(ws, x).sum())(ws)
    >>> apply.plan_for(ws, x).forward_evaluations
    22
  """
  if callable(layers) and not isinstance(layers, (list, tuple)):
    return _stacked(layers, plan_or_segmenter)
  layers = tuple(layers)
  if not layers:
    raise ValueError(f"{_API} needs at least one layer, but got an empty sequence.")
  for i, f in enumerate(layers):
    if not callable(f):
      raise TypeError(f"{_API}: layer {i} must be a function `layer(p, x)` or `layer(p, x, key)`, "
                      f"but got {f!r}.")
  _check_plan_or_segmenter(plan_or_segmenter, len(layers))

  def plan_for(params, x, key=None) -> plan_lib.Plan:
    return plan_for_chain(layers, plan_or_segmenter, params, x, key)

  def apply(params, x, key=None):
    if len(params) != len(layers):
      raise ValueError(
          f"{_API}: got {len(params)} parameter entries for {len(layers)} layers; pass one "
          "parameter pytree per layer (use `()` for parameterless layers).")
    plan = plan_for(params, x, key)
    return plan_lib.apply_plan(plan, layers, params, x, key)

  apply.plan_for = plan_for  # type: ignore[attr-defined]
  return apply


def plan_for_chain(layers: Sequence[Callable], plan_or_segmenter: Any, params: Sequence[Any], x: Any,
                   key: Any = None, *, compile: bool = False) -> plan_lib.Plan:
  """The plan ``remat.sequential`` uses for these shapes, optionally with its compiled temp.

  Args:
    layers: the chain of layer functions.
    plan_or_segmenter: a ``remat.Plan`` or a segmenter.
    params: one parameter pytree per layer (arrays or ``jax.ShapeDtypeStruct``).
    x: the chain input (an array or a ``jax.ShapeDtypeStruct``).
    key: an optional PRNG key (or its spec).
    compile: also compile the chain's training step under the plan and fill
      ``Plan.compiled_temp_bytes`` (``budget`` plans always carry it), and
      measure bytes so ``predicted_peak_bytes`` is filled for every segmenter.

  Returns:
    A ``remat.Plan`` (predicted and, with ``compile=True``, compiled numbers).

  Raises:
    ValueError: as the segmenter's ``plan`` (a budget below the smallest
      feasible one names that budget).

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> layer = lambda w, x: jnp.tanh(x @ w)
    >>> w = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    >>> x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    >>> p = remat.segmenters.plan_for([layer] * 4, remat.segmenters.every(2), [w] * 4, x, compile=True)
    >>> p.compiled_temp_bytes > 0 and p.predicted_peak_bytes > 0
    True
  """
  layers = tuple(layers)
  _check_plan_or_segmenter(plan_or_segmenter, len(layers))
  p_spec, x_spec, k_spec = costs_lib.spec(tuple(params)), costs_lib.spec(x), costs_lib.spec(key)
  if isinstance(plan_or_segmenter, plan_lib.Plan):
    plan = plan_or_segmenter
    if compile:
      costs = costs_lib.measure_costs(layers, p_spec, x_spec, k_spec)
      plan = plan_lib.make_plan(plan.root, costs, plan.num_layers, plan.segmenter)
  elif isinstance(plan_or_segmenter, seg_lib.budget):
    plan = _budget_plan(layers, plan_or_segmenter, p_spec, x_spec, k_spec)
  elif compile:
    plan = plan_or_segmenter.plan(costs_lib.measure_costs(layers, p_spec, x_spec, k_spec))
  else:
    plan = plan_or_segmenter.plan(len(layers))
  if compile and plan.compiled_temp_bytes is None:
    temp = _compiled_temp(plan, layers, p_spec, x_spec, k_spec)
    plan = dataclasses.replace(plan, compiled_temp_bytes=temp)
  return plan


### Implementation


def _stacked(layer: Callable, plan_or_segmenter: Any) -> Callable:
  """``sequential`` for one layer function over parameters stacked on axis 0."""
  if not (isinstance(plan_or_segmenter, plan_lib.Plan) or callable(getattr(plan_or_segmenter, "plan", None))):
    _check_plan_or_segmenter(plan_or_segmenter, 0)
  caller = plan_lib.layer_callers([layer])[0]

  def depth_of(params):
    sizes = {int(a.shape[0]) for a in jax.tree_util.tree_leaves(params)}
    if len(sizes) != 1:
      raise ValueError(
          f"{_API} with a single layer expects every parameter leaf stacked on a leading axis of "
          f"the same size (the depth), but got leading sizes {sorted(sizes)}.")
    return sizes.pop()

  def unstack(params, n):
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], params) for i in range(n)]

  def plan_for(params, x, key=None) -> plan_lib.Plan:
    n = depth_of(params)
    if isinstance(plan_or_segmenter, plan_lib.Plan) or not isinstance(plan_or_segmenter, seg_lib.budget):
      _check_plan_or_segmenter(plan_or_segmenter, n)
      return plan_or_segmenter if isinstance(plan_or_segmenter, plan_lib.Plan) \
          else plan_or_segmenter.plan(n)
    p0 = costs_lib.spec(jax.tree_util.tree_map(lambda a: a[0], params))
    return plan_for_chain([layer] * n, plan_or_segmenter, [p0] * n, x, key)

  def apply(params, x, key=None):
    n = depth_of(params)
    plan = plan_for(params, x, key)
    levels = _regular_levels(plan.root)
    if levels is None:
      return plan_lib.apply_plan(plan, [layer] * n, unstack(params, n), x, key)
    keys = None if key is None else jax.vmap(lambda i: plan_lib.layer_keys(key, i))(jnp.arange(n))
    return _scan_levels(caller, levels, params, x, keys)

  apply.plan_for = plan_for  # type: ignore[attr-defined]
  apply.scanned = lambda params, x, key=None: _regular_levels(plan_for(params, x, key).root) is not None  # type: ignore[attr-defined]
  return apply


def _regular_levels(seg: plan_lib.Segment):
  """``[(count, checkpoint), ...]`` from the outside in when every level is uniform, else None."""
  if _has_offload(seg):  # offloaded inputs: run unrolled, where each segment keeps its flag
    return None
  if not seg.children:
    return [(seg.size, False)]
  first = seg.children[0]
  shape = _shape(first)
  if any(_shape(c) != shape for c in seg.children):
    return None
  inner = _regular_levels(dataclasses.replace(first, checkpoint=False))
  if inner is None:
    return None
  return [(len(seg.children), first.checkpoint)] + inner


def _has_offload(seg: plan_lib.Segment) -> bool:
  return seg.offload or any(_has_offload(c) for c in seg.children)


def _shape(seg: plan_lib.Segment):
  return (seg.size, seg.checkpoint, tuple(_shape(c) for c in seg.children))


def _scan_levels(caller, levels, params, x, keys):
  """Nested ``lax.scan``: level ``(count, ck)`` scans ``count`` sub-stacks, checkpointing each if ``ck``."""
  (count, ck), rest = levels[0], levels[1:]
  split = lambda a: a.reshape((count, a.shape[0] // count) + a.shape[1:])  # noqa: E731
  if not rest:  # taped layers
    def body(x, pk):
      p, k = pk
      return plan_lib.call_tied(caller, p, x, k), None
    return jax.lax.scan(body, x, (params, keys))[0]

  def sub(p, x, k):
    return _scan_levels(caller, rest, p, x, k)

  f = transform.checkpoint(sub) if ck else sub

  def body(x, pk):
    p, k = pk
    return f(p, x, k), None

  stacked = jax.tree_util.tree_map(split, (params, keys))
  return jax.lax.scan(body, x, stacked)[0]



def _check_plan_or_segmenter(obj, n):
  if isinstance(obj, plan_lib.Plan):
    if obj.num_layers != n:
      raise ValueError(f"{_API}: the plan is for {obj.num_layers} layers but the chain has {n}; "
                       "make the plan for this chain (`segmenter.plan(len(layers))`).")
    return
  if not callable(getattr(obj, "plan", None)):
    raise TypeError(
        f"{_API} expects a `remat.Plan` or a segmenter such as `remat.segmenters.every(4)` or "
        f"`remat.segmenters.budget(2**30)`, but got {obj!r}.")


def _compiled_temp(plan, layers, p_spec, x_spec, k_spec) -> int:
  run = lambda ps, x, k: plan_lib.apply_plan(plan, layers, ps, x, k)
  return profile_lib.profile(costs_lib.step_of(run), p_spec, x_spec, k_spec).temp_bytes


def _budget_plan(layers, seg: seg_lib.budget, p_spec, x_spec, k_spec) -> plan_lib.Plan:
  callers = plan_lib.layer_callers(layers)
  ids, x_cur = [], x_spec
  for f, p in zip(callers, p_spec, strict=True):
    ids.append(costs_lib.layer_cache_key(f, p, x_cur, k_spec))
    x_cur = jax.eval_shape(f, p, x_cur, k_spec)
  cache_key = (seg, tuple(ids))
  if cache_key in _PLANS:
    return _PLANS[cache_key]
  costs = costs_lib.measure_costs(layers, p_spec, x_spec, k_spec)
  smallest = seg_lib._BudgetDP(costs).min_peak()
  # Keep a little room for what the caller's own step adds (a loss, another
  # argnums: a few hundred bytes measured) on top of the reference step.
  limit = int(seg.max_bytes * (1 - _SLACK))
  target = limit
  tried, seen, best = [], set(), None
  for _ in range(seg.max_compiles):
    plan = seg.plan(costs, target_bytes=target)
    if plan.root in seen:
      break
    seen.add(plan.root)
    temp = _compiled_temp(plan, layers, p_spec, x_spec, k_spec)
    tried.append((plan.forward_evaluations, plan.predicted_peak_bytes, temp))
    fits = temp <= limit
    if fits and (best is None or plan.predicted_flops < best.predicted_flops):
      best = dataclasses.replace(plan, compiled_temp_bytes=temp)
    if fits and (plan.recomputed_evaluations == 0 or temp >= 0.98 * limit):
      break
    # Correct the model's bias with the compiled number: aim lower after an
    # overshoot, higher when the program came out smaller than predicted.
    if fits:
      target = int(target * limit / max(temp, 1))
    else:
      target = int(math.floor(min(target * limit / temp, plan.predicted_peak_bytes - 1)))
      if target < smallest:
        break
  if best is not None:
    _PLANS[cache_key] = best
    return best
  detail = "; ".join(f"{e} evaluations: predicted {p:,} B, compiled {t:,} B" for e, p, t in tried)
  raise ValueError(
      f"`remat.segmenters.budget({seg.max_bytes})`: no plan found whose compiled temp memory fits "
      f"{limit:,} bytes (99.5% of the budget) in {len(tried)} compile(s) ({detail}). Raise "
      f"`max_bytes` to at least {math.ceil(min(t for _, _, t in tried) / (1 - _SLACK)):,} bytes, "
      "or `max_compiles`.")
