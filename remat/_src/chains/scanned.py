"""Plans for scanned stacks: N identical layers whose parameters are stacked on axis 0.

A stack runs as nested ``lax.scan``s (``execute.scan_levels``), which needs a
*regular* plan: at every level the segments have the same shape
(``plan_lib.regular_levels``). This module decides the plan of a stack and says
in a :class:`ScanPlan` whether and how it is scanned. It is shared by
``remat.linen.scan`` and ``remat.nnx.Scan`` / ``remat.nnx.scan``:

* uniform segmenters (``every(k)`` with ``k`` dividing the depth, ``sqrt()``
  and ``multilevel(levels)`` where their segments divide evenly, ``None``)
  give regular plans, which are scanned;
* plans that are not regular (``revolve``, ``none``, non-dividing sizes,
  offloaded inputs) are reported (``ScanPlan.reason``) and never unrolled: the
  adapters raise :class:`NotScannableError` when such a plan would run;
* ``budget(max_bytes)`` measures one layer, lists every regular plan for the
  depth under the cost model and takes the cheapest (in the flops a *scan*
  makes) whose compiled temp memory fits, compiling the scanned stack itself to
  verify; ``auto()`` (``remat.fit``) plans as usual and its plan, if irregular,
  is replaced by the cheapest regular plan predicted to need no more memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax

from remat._src.measure import costs as costs_lib
from remat._src.chains import execute
from remat._src.plans import plan as plan_lib
from remat._src.measure import profile as profile_lib
from remat._src.plans import segmenters as seg_lib
from remat._src.fitting.budget import budget as budget_cls
from remat._src.fitting.fit import auto as auto_cls
from remat._src.plans.plan import LayerCost, Plan, Segment, make_plan

Levels = tuple[tuple[int, bool], ...]
_SNAPPED: dict[Any, Plan] = {}
_MAX_NESTING = 4


class NotScannableError(ValueError):
  """A scanned stack was given a plan that cannot run as nested ``lax.scan``s (a ``ValueError``)."""


@dataclasses.dataclass(frozen=True)
class ScanPlan:
  """How a scanned stack runs: its plan, and the nested scans that execute it.

  Attributes:
    plan: the plan of the stack (for ``budget``/``auto``: the regular plan chosen).
    levels: ``((count, checkpointed), ...)`` from the outside in: the outer
      scan runs ``count`` sub-stacks, each checkpointed if ``checkpointed``;
      ``()`` when the plan cannot be scanned.
    reason: why the plan cannot be scanned, or ``None``.
    requested: the segmenter's own plan when a regular one replaced it, else ``None``.
  """

  plan: Plan
  levels: Levels
  reason: str | None = None
  requested: Plan | None = None

  @property
  def scanned(self) -> bool:
    return bool(self.levels)

  @property
  def forward_evaluations(self) -> int:
    """Layer forward evaluations the scanned program makes in one training step.

    A scan runs the same program at every iteration, so the forward of a
    trailing checkpointed sub-stack inside a recomputation is not dropped as
    it is in an unrolled plan: this can exceed ``plan.forward_evaluations``.
    """
    return scanned_evaluations(self.levels) if self.levels else self.plan.forward_evaluations

  def __str__(self) -> str:
    if not self.scanned:
      return f"not scannable: {self.reason}\n{self.plan}"
    head = f"scanned as {describe_levels(self.levels)}: {self.forward_evaluations} forward evaluations"
    if self.requested is not None:
      head += f" (replaces the irregular plan of {self.requested.made_by})"
    return f"{head}\n{self.plan}"


### Main entry points (used by the Flax adapters)


def check_scannable(segmenter: Any, n: int, api: str) -> None:
  """Raises :class:`NotScannableError` now if ``segmenter``'s plan for ``n`` layers is known and irregular.

  Plans that need measured costs (``budget``, ``auto``) are made at trace time
  and are always regular (``budget`` with host offload is refused here).
  """
  if segmenter is not None:
    seg_lib.check_segmenter(segmenter, f"the `segmenter` of {api}", n)
  if isinstance(segmenter, budget_cls) and segmenter.offload is not None:
    raise NotScannableError(
        f"{api} runs every layer with the same program, so it cannot offload some segments' inputs "
        f"as `{segmenter!r}` may; drop `offload=` from `remat.segmenters.budget`, or use "
        "`remat.linen.Sequential` / `remat.nnx.Sequential` (unrolled).")
  if not measures_layer(segmenter):
    sp = plan_stack(segmenter, n, api=api)
    if not sp.scanned:
      raise NotScannableError(sp.reason)


def measures_layer(segmenter: Any) -> bool:
  """Whether planning a stack under ``segmenter`` measures its layer: for cost-based segmenters,
  and for ``auto()`` always (even when ``remat.fit`` hands it a chosen plan and measures nothing
  else): its plan is snapped to the cheapest regular plan by the layer's costs."""
  if segmenter is None or isinstance(segmenter, Plan):
    return False
  return bool(segmenter.needs_costs) or isinstance(segmenter, auto_cls)


def plan_stack(segmenter: Any, n: int, *, api: str, layer: Callable | None = None, p_spec: Any = None,
               x_spec: Any = None, k_spec: Any = None) -> ScanPlan:
  """The :class:`ScanPlan` of a stack of ``n`` layers.

  Args:
    segmenter: ``None`` (plain backprop), a ``remat.Plan`` or a segmenter.
    n: the depth.
    api: the public name, for messages.
    layer: ``layer(p, x, key) -> y`` for one layer (needed by ``budget``/``auto``).
    p_spec: the parameters of one layer (specs), for measuring.
    x_spec: the stack's input spec.
    k_spec: one layer's key (or other per-layer input) spec, or ``None``.
  """
  if segmenter is None:
    plan = make_plan(Segment(0, n), None, n, "plain")
  elif isinstance(segmenter, Plan):
    plan = segmenter
  elif measures_layer(segmenter):
    return _cost_based(segmenter, n, api, layer, p_spec, x_spec, k_spec)
  else:
    plan = segmenter.plan(n)
  levels = plan_lib.regular_levels(plan)
  if levels is None:
    return ScanPlan(plan, (), reason=not_scannable_reason(plan, n, api))
  return ScanPlan(plan, tuple(levels))


def not_scannable_reason(plan: Plan, n: int, api: str) -> str:
  """Why ``plan`` cannot be scanned, and which segmenters can be, for a depth of ``n``."""
  policies = getattr(plan, "layer_policies", None)
  if _offloads(plan.root):
    why = "it keeps some segments' inputs in host memory"
  elif policies and any(p != policies[0] for p in policies):
    why = "its layers use different checkpoint policies"
  else:
    why = f"its segments differ in shape (top level: sizes {[c.size for c in plan.root.children]})"
  return (
      f"{api}: the plan of `{plan.made_by or 'custom'}` for {n} layers cannot run as nested "
      f"`lax.scan`s: {why}, and a scanned stack runs one program for every iteration. It is never "
      f"unrolled silently. Use a segmenter with a regular plan for {n} layers: "
      f"{', '.join(scannable_segmenters(n))}; or `remat.segmenters.budget(max_bytes)`, which "
      "chooses among regular plans; or run the irregular plan unrolled with "
      "`remat.linen.Sequential` / `remat.nnx.Sequential`.")


def scannable_segmenters(n: int) -> list[str]:
  """The uniform segmenters whose plan for ``n`` layers is regular (for messages)."""
  ks = [k for k in range(1, n + 1) if n % k == 0]
  out = [f"`every(k)` for k in {ks}"]
  for name, seg in [("sqrt()", seg_lib.sqrt())] + [(f"multilevel({m})", seg_lib.multilevel(m))
                                                    for m in (1, 2, 3)]:
    if plan_lib.regular_levels(seg.plan(n)) is not None:
      out.append(f"`{name}`")
  return out


### Regular plans


def scanned_evaluations(levels: Levels) -> int:
  """Forward evaluations of one training step of a stack scanned as ``levels``.

  Under differentiation a level ``(count, checkpointed)`` over sub-stacks of
  ``m`` layers makes ``count * (m + T(rest))`` evaluations when checkpointed
  (a forward without tape, then the sub-stack again under AD in the backward
  pass) and ``count * T(rest)`` otherwise; a single layer makes one.

  Example:

    >>> from remat._src.chains.scanned import scanned_evaluations
    >>> scanned_evaluations(((12, True), (4, False)))  # every(4) on 48 layers
    96
  """
  if not levels:
    return 1
  (count, ck), rest = levels[0], tuple(levels[1:])
  inner = scanned_evaluations(rest)
  return count * (math.prod(c for c, _ in rest) + inner) if ck else count * inner


def levels_tree(levels: Levels) -> Segment:
  """The segment tree of a regular plan (``plan_lib.regular_levels`` inverts it)."""
  n = math.prod(c for c, _ in levels)

  def children(start, levels):
    if len(levels) <= 1:
      return ()
    (count, ck), rest = levels[0], levels[1:]
    per = math.prod(c for c, _ in rest)
    return tuple(Segment(start + i * per, start + (i + 1) * per, children(start + i * per, rest), ck)
                 for i in range(count))

  return Segment(0, n, children(0, tuple(levels)))


def regular_candidates(n: int, max_nesting: int = _MAX_NESTING) -> list[Levels]:
  """Every regular plan of ``n`` layers with at most ``max_nesting`` checkpointed levels.

  Plain backprop, and for every ordered factorisation ``n = c1 * ... * cm * k``
  (``ci >= 2``, ``k >= 1``) ``ci`` checkpointed segments at level ``i`` around
  ``k`` taped layers.
  """
  out: list[Levels] = [((n, False),)]

  def rec(prefix, rest):
    if len(prefix) >= max_nesting:
      return
    for c in range(2, rest + 1):
      if rest % c == 0:
        levels = prefix + ((c, True),)
        out.append(levels + ((rest // c, False),))
        rec(levels, rest // c)

  rec((), n)
  return out


### Cost-based segmenters: snap to a regular plan


def _cost_based(segmenter, n, api, layer, p_spec, x_spec, k_spec) -> ScanPlan:
  if layer is None:
    raise ValueError(f"{api}: `{segmenter!r}` needs the layer and its shapes to measure costs.")
  cost = costs_lib.measure_costs([layer], [p_spec], x_spec, k_spec)[0]
  costs = (cost,) * n
  candidates = [make_plan(levels_tree(lv), costs, n, f"scan {describe_levels(lv)}")
                for lv in regular_candidates(n)]
  if isinstance(segmenter, budget_cls):
    key = (segmenter, n, costs_lib.layer_cache_key(layer, p_spec, x_spec, k_spec))
    if key not in _SNAPPED:
      temp = lambda plan: _compiled_temp(plan, layer, n, p_spec, x_spec, k_spec)  # noqa: E731
      _SNAPPED[key] = _verified(segmenter, candidates, cost, temp, api)
    plan = _SNAPPED[key]
    return ScanPlan(plan, tuple(plan_lib.regular_levels(plan)))
  requested = segmenter.plan(costs)
  if plan_lib.regular_levels(requested) is not None:
    return ScanPlan(requested, tuple(plan_lib.regular_levels(requested)))
  limit = requested.predicted_peak_bytes
  fits = [p for p in candidates if limit is None or p.predicted_peak_bytes <= limit]
  if not fits:  # nothing regular is predicted that small: the smallest regular plan
    fits = [min(candidates, key=lambda p: p.predicted_peak_bytes)]
  plan = min(fits, key=lambda p: (_scan_flops(p, cost), p.predicted_peak_bytes))
  plan = dataclasses.replace(plan, made_by=f"{segmenter!r} -> {plan.made_by}")
  return ScanPlan(plan, tuple(plan_lib.regular_levels(plan)), requested=requested)


def _verified(seg, candidates: list[Plan], cost: LayerCost, temp: Callable[[Plan], int], api: str) -> Plan:
  """The cheapest regular plan (in scanned flops) whose compiled temp fits ``seg.max_bytes``."""
  limit = seg.max_bytes
  smallest = min(p.predicted_peak_bytes for p in candidates)
  # Predictions of these uniform plans were within 0-20% (docs/facts.md, fact 7): try the cheapest plausible.
  options = sorted((p for p in candidates if 0.8 * p.predicted_peak_bytes <= limit),
                   key=lambda p: (_scan_flops(p, cost), p.predicted_peak_bytes))
  if not options:
    raise ValueError(
        f"{api} with `{seg!r}`: no regular (scannable) plan is predicted to fit {limit:,} bytes; the "
        f"smallest predicted is {smallest:,} bytes ({smallest / 2**20:,.2f} MiB). Raise `max_bytes`, "
        "or make the layers smaller.")
  tried = []
  for plan in options[:seg.max_compiles]:
    got = int(temp(plan))
    tried.append(got)
    if got <= limit:
      return dataclasses.replace(plan, made_by=f"{seg!r} -> {plan.made_by}", compiled_temp_bytes=got)
  raise ValueError(
      f"{api} with `{seg!r}`: no regular (scannable) plan compiled to at most {limit:,} bytes of temp "
      f"memory in {len(tried)} compile(s); the smallest was {min(tried):,} bytes "
      f"({min(tried) / 2**20:,.2f} MiB). Raise `max_bytes` (or `max_compiles`).")


def _compiled_temp(plan: Plan, layer, n, p_spec, x_spec, k_spec) -> int:
  """Compiled temp bytes of the stack's reference step, scanned under ``plan``."""
  levels = plan_lib.regular_levels(plan)
  stack = lambda a: jax.ShapeDtypeStruct((n,) + tuple(a.shape), a.dtype)  # noqa: E731
  ps, ks = jax.tree_util.tree_map(stack, p_spec), jax.tree_util.tree_map(stack, k_spec)
  run = lambda ps, x, ks: execute.scan_levels(layer, levels, ps, x, ks)  # noqa: E731
  return profile_lib.profile(costs_lib.reference_step(run), ps, x_spec, ks).temp_bytes


def _scan_flops(plan: Plan, cost: LayerCost) -> float:
  levels = plan_lib.regular_levels(plan)
  extra = scanned_evaluations(tuple(levels)) - plan.forward_evaluations
  return (plan.predicted_flops or 0.0) + extra * cost.flops


### Helpers


def describe_levels(levels: Levels) -> str:
  """``12 x checkpoint(4 taped)`` style description of nested scans."""
  (count, ck), rest = levels[0], tuple(levels[1:])
  if not rest:
    return f"{count} taped"
  inner = describe_levels(rest)
  return f"{count} x " + (f"checkpoint({inner})" if ck else inner)


def _offloads(seg: Segment) -> bool:
  return seg.offload or any(_offloads(c) for c in seg.children)
