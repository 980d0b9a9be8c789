"""``remat.sequential``: a chain of layer functions run under a plan or a segmenter.

It asks a :class:`Segmenter` for a plan at trace time, for the traced shapes
(measuring the layers first when the segmenter needs costs, and handing it a
:class:`Verifier` that compiles candidate plans), then runs the plan with
``execute.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax

from remat._src.measure import costs as costs_lib
from remat._src.chains import execute
from remat._src.plans import plan as plan_lib
from remat._src.measure import profile as profile_lib
from remat._src.util import signature
from remat._src.util import specs
from remat._src.plans.plan import Plan, Segment, Verifier, make_plan
from remat._src.plans.segmenters import check_segmenter

_API = "`remat.sequential`"


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
    ``apply.plan_for(params, x, key=None, *, compile=False)`` returns the plan
    it would use for these shapes (arrays or ``jax.ShapeDtypeStruct``); with
    ``compile=True`` it also measures the layers (predicted bytes for every
    segmenter) and compiles the chain's step (``Plan.compiled_temp_bytes``).

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
  check_segmenter(plan_or_segmenter, _API, len(layers))

  def plan_for(params, x, key=None, *, compile: bool = False) -> Plan:
    return chain_plan(layers, plan_or_segmenter, params, x, key, compile=compile)

  def apply(params, x, key=None):
    if len(params) != len(layers):
      raise ValueError(
          f"{_API}: got {len(params)} parameter entries for {len(layers)} layers; pass one "
          "parameter pytree per layer (use `()` for parameterless layers).")
    return execute.apply_plan(plan_for(params, x, key), layers, params, x, key)

  apply.plan_for = plan_for  # type: ignore[attr-defined]
  return apply


def chain_plan(layers: Sequence[Callable], plan_or_segmenter: Any, params: Sequence[Any], x: Any,
               key: Any = None, *, compile: bool = False) -> Plan:
  """The plan ``remat.sequential`` uses for these shapes (``compile=True``: with compiled temp).

  With ``compile=True`` the layers are measured (so ``predicted_peak_bytes`` is
  filled for every segmenter) and the chain's reference step is compiled under
  the plan (``compiled_temp_bytes``).
  """
  layers = tuple(layers)
  check_segmenter(plan_or_segmenter, _API, len(layers))
  p_spec, x_spec, k_spec = specs.spec(tuple(params)), specs.spec(x), specs.spec(key)
  obj = plan_or_segmenter
  if isinstance(obj, Plan):
    plan = obj
    if compile:
      used = sorted({p for p in plan.layer_policies if p is not None})
      costs = costs_lib.measure_costs(layers, p_spec, x_spec, k_spec, policies=used or False)
      plan = make_plan(plan.root, costs, plan.num_layers, plan.made_by)
  elif obj.needs_costs or compile:
    costs = costs_lib.measure_costs(layers, p_spec, x_spec, k_spec, policies=obj.policies)
    verifier = Verifier(key=costs_lib.chain_key(layers, p_spec, x_spec, k_spec),
                        temp_bytes=lambda plan: _compiled_temp(plan, layers, p_spec, x_spec, k_spec),
                        global_shapes=specs.layout_unknown(x))
    plan = obj.plan(costs, verifier=verifier)
  else:
    plan = obj.plan(len(layers))
  if compile and plan.compiled_temp_bytes is None:
    plan = dataclasses.replace(plan, compiled_temp_bytes=_compiled_temp(plan, layers, p_spec, x_spec, k_spec))
  return plan


### Implementation


def _stacked(layer: Callable, plan_or_segmenter: Any) -> Callable:
  """``sequential`` for one layer function over parameters stacked on axis 0."""
  check_segmenter(plan_or_segmenter, _API)
  caller = signature.layer_callers([layer])[0]

  def depth_of(params):
    sizes = {int(a.shape[0]) for a in jax.tree_util.tree_leaves(params)}
    if len(sizes) != 1:
      raise ValueError(
          f"{_API} with a single layer expects every parameter leaf stacked on a leading axis of "
          f"the same size (the depth), but got leading sizes {sorted(sizes)}.")
    return sizes.pop()

  def plan_for(params, x, key=None, *, compile: bool = False) -> Plan:
    n = depth_of(params)
    p0 = specs.spec(jax.tree_util.tree_map(lambda a: a[0], params))
    return chain_plan([layer] * n, plan_or_segmenter, [p0] * n, x, key, compile=compile)

  def apply(params, x, key=None):
    n = depth_of(params)
    plan = plan_for(params, x, key)
    levels = plan_lib.regular_levels(plan)
    if levels is None:
      unstacked = [jax.tree_util.tree_map(lambda a, i=i: a[i], params) for i in range(n)]
      return execute.apply_plan(plan, [layer] * n, unstacked, x, key)
    return execute.scan_levels(caller, levels, params, x, execute.stacked_keys(key, n),
                               policy=execute.layer_policy(plan))

  apply.plan_for = plan_for  # type: ignore[attr-defined]
  apply.scanned = lambda params, x, key=None: (  # type: ignore[attr-defined]
      plan_lib.regular_levels(plan_for(params, x, key)) is not None)
  return apply


def _compiled_temp(plan, layers, p_spec, x_spec, k_spec) -> int:
  run = lambda ps, x, k: execute.apply_plan(plan, layers, ps, x, k)  # noqa: E731
  return profile_lib.measure(costs_lib.reference_step(run), p_spec, x_spec, k_spec).temp_bytes


def plain_plan(num_layers: int) -> Plan:
  """Plain backprop (nothing checkpointed) as a plan."""
  return make_plan(Segment(0, num_layers), None, num_layers, "plain")
