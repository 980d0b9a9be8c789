"""``budget(max_bytes)``: the fewest recomputed flops whose memory fits, verified by compiling.

A dynamic program in the spirit of Rotor (Beaumont et al.) over nested
segment trees chooses, head by head, to tape a layer or to checkpoint a
segment (store its input; recompute the inside with its own optimal plan),
minimising flops subject to the peak predicted from measured
:class:`LayerCost` s (``plan.py`` defines the cost model). Given a
:class:`Verifier`, the plan is compiled; if the compiled program does not fit,
the target is corrected by the compiled number and the plan made again,
within ``max_compiles`` compiles. Verified plans are cached per chain.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, ClassVar, Sequence

import jax
import numpy as np

from remat._src.core import offload as offload_lib
from remat._src.measure import plan_cache
from remat._src.plans import search as search_lib
from remat._src.plans import segmenters as seg_lib
from remat._src.plans.plan import (LayerCost, Plan, Segment, Verifier, backward_transient, forward_peak, leaf,
                              make_plan)
from remat._src.util.units import exact_bytes

_API = "`remat.segmenters.budget`"
_VERIFIED: dict[Any, Plan] = {}


class GlobalShapesWarning(UserWarning):
  """A budget is applied to global shapes because the chain's per-device layout is unknown."""



@dataclasses.dataclass(frozen=True)
class budget:  # noqa: N801 - reads as a phrase: `segmenters.budget(2**30)`
  """The plan with the fewest recomputed flops whose temp memory fits ``max_bytes``.

  ``max_bytes`` bounds the compiled temp memory of the chain's reference
  training step (``value_and_grad`` of its summed output with respect to
  parameters and input): activations, residuals and working buffers, not
  parameters, inputs or gradients. Through ``remat.sequential`` or the Flax
  ``Sequential`` s the plan is made per traced shape (per device, where the
  chain's sharding is known) and verified by compiling it; no uniform
  segmentation that compiles under ``max_bytes`` needs fewer flops. Where
  plain backprop fits, it recomputes nothing. To fit a whole training step
  (parameters, optimizer state) to a device, use ``remat.fit`` with
  ``remat.segmenters.auto()``.

  Args:
    max_bytes: the memory budget in bytes (a positive int).
    offload: a ``remat.offload.host(...)`` policy, or ``None``. On a backend
      that executes host offload (GPU, TPU) the planner may then keep a
      checkpointed segment's input in host memory instead of recomputing
      more, charging only the part of the transfer that cannot hide behind
      the segment's forward compute (``HostOffload.link``).
    max_compiles: how many candidate plans may be compiled to find the cheapest that fits.
    policies: also choose, per taped layer, a recomputation policy from the
      layer's measured menu (save its matmul outputs, or subsets of its
      ``checkpoint_name`` tags): selective recomputation inside blocks,
      jointly with the segments. ``False`` tapes layers whole.

  Raises:
    ValueError: if ``max_bytes`` or ``max_compiles`` is not a positive int.

  Example:

    >>> import remat
    >>> from remat.segmenters import LayerCost
    >>> c = [LayerCost(1000, 1000, 1000, 1000, 1e6, 3e6)] * 8
    >>> remat.segmenters.budget(12_000).plan(c).recomputed_evaluations
    0
    >>> remat.segmenters.budget(6_000).plan(c).predicted_peak_bytes <= 6_000
    True
  """

  max_bytes: int
  offload: Any = dataclasses.field(default=None, kw_only=True)
  max_compiles: int = dataclasses.field(default=12, kw_only=True)
  policies: bool = dataclasses.field(default=True, kw_only=True)
  needs_costs: ClassVar[bool] = True

  def __repr__(self) -> str:
    extra = (f", offload={self.offload!r}" if self.offload is not None else "") + (
        f", max_compiles={self.max_compiles}" if self.max_compiles != 12 else "") + (
        ", policies=False" if not self.policies else "")
    return f"budget({self.max_bytes}{extra})"

  def __post_init__(self):
    seg_lib.check_positive_int(self.max_bytes, "max_bytes", _API[1:-1], "budget(2**30)")
    seg_lib.check_positive_int(self.max_compiles, "max_compiles", _API[1:-1],
                               "budget(2**30, max_compiles=12)")
    if self.offload is not None:
      offload_lib.validate_offload(self.offload, api=_API)
    if not isinstance(self.policies, bool):
      raise TypeError(f"the `policies` argument to {_API} must be a bool, but got {self.policies!r}.")

  def plan(self, costs: Sequence[LayerCost], *, verifier: Verifier | None = None,
           target_bytes: int | None = None, backend: str | None = None) -> Plan:
    """The cheapest :class:`Plan` whose predicted (with ``verifier``: compiled) temp fits.

    Args:
      costs: per-layer :class:`LayerCost` (``remat.segmenters.measure_costs``).
      verifier: compile candidates with it and return the cheapest that fits.
      target_bytes: plan for this many bytes instead of ``max_bytes``.
      backend: the platform planned for; default ``jax.default_backend()``.
        Decides whether offload is an option.

    Raises:
      ValueError: if ``costs`` carry no bytes, or no plan fits (the message
        names the smallest feasible budget).
    """
    costs = _check_costs(costs)
    if verifier is not None:
      return self._verified(costs, verifier, backend)
    target = self.max_bytes if target_bytes is None else int(target_bytes)
    dp = _BudgetDP(costs, offload_candidates(costs, self.offload, backend=backend), self.offload,
                   backend=backend)
    smallest = int(math.ceil(dp.min_peak()))
    if target < smallest:
      raise ValueError(
          f"{self._call()}: no plan is predicted to fit {exact_bytes(target)}; the smallest feasible budget "
          f"for this chain is {exact_bytes(smallest)}, predicted. Raise `max_bytes` to at least "
          f"{smallest}, or make the layers smaller.")
    return make_plan(dp.solve(target), costs, len(costs), repr(self))

  def _call(self) -> str:
    """This budget as code, for messages: ``remat.segmenters.budget(1024)``."""
    return f"`remat.segmenters.budget({self.max_bytes})`"

  def _verified(self, costs: tuple[LayerCost, ...], verifier: Verifier, backend) -> Plan:
    cache_key = (self, verifier.key, backend)
    if verifier.global_shapes and cache_key not in _VERIFIED:
      warnings.warn(
          f"{self._call()} plans with global shapes: the chain runs on a mesh with `Auto` "
          "axes, whose layout XLA chooses after tracing, so the bytes per device are not known here "
          "and the budget is applied to the whole (unsharded) chain. For a per-device budget, shard "
          "with explicit axes (`jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Explicit,))`, "
          "the default of `jax.make_mesh`) or fit the whole step with `remat.fit`.",
          GlobalShapesWarning, stacklevel=2)
    if cache_key not in _VERIFIED:
      material = {"budget": repr(self), "chain": verifier.key, "backend": backend}
      plan = self._from_disk(material, verifier)
      if plan is None:
        dp = _BudgetDP(costs, offload_candidates(costs, self.offload, backend=backend), self.offload,
                       backend=backend)
        plan = verified_search(dp, costs, self.max_bytes, verifier.temp_bytes, self.max_compiles,
                               name=repr(self), api=self._call())
        plan_cache.store("budget", material, plan_cache.encode_plan(plan))
      _VERIFIED[cache_key] = plan
    return _VERIFIED[cache_key]

  def _from_disk(self, material, verifier: Verifier) -> Plan | None:
    """The persistent cache's plan for this chain, compiled once more: used only if it still fits."""
    value = plan_cache.load("budget", material)
    if value is None:
      return None
    try:
      plan = plan_cache.decode_plan(value)
    except (KeyError, TypeError, ValueError) as e:
      plan_cache.warn_unusable("budget", material, f"does not decode ({type(e).__name__}: {e})")
      return None
    temp = int(verifier.temp_bytes(plan))
    if temp > self.max_bytes:
      plan_cache.log.info("%s: the cached plan compiles to %d bytes, over the budget; searching",
                          self._call(), temp)
      return None
    return dataclasses.replace(plan, compiled_temp_bytes=temp)


def uniform_plans(costs: Sequence[LayerCost]) -> list[Plan]:
  """Plain backprop, the uniform segmentations of a chain (``every(k)``, ``revolve(s)``,
  ``multilevel``) and every layer under one policy, evaluated under the cost model: the
  candidates a verified search must consider."""
  n = len(costs)
  segs: list[Any] = [seg_lib.every(k) for k in _every_sizes(n)]
  segs += [seg_lib.revolve(s) for s in range(1, min(n, 8) + 1)]
  segs += [seg_lib.multilevel(2), seg_lib.multilevel(3)]
  out, seen = [make_plan(Segment(0, n), costs, n, "plain")], set()
  for seg in segs:
    plan = seg.plan(costs)
    if plan.root not in seen:
      seen.add(plan.root)
      out.append(plan)
  # Every layer taped under the same policy (a hand-picked preset), where all layers offer it.
  shared = set.intersection(*[{name for name, _ in c.policies} for c in costs])
  for policy in sorted(shared):
    out.append(make_plan(Segment(0, n, policy=policy), costs, n, f"every layer: {policy}"))
  return out


def verified_search(dp: _BudgetDP, costs: tuple[LayerCost, ...], limit: int,
                    temp_bytes: Callable[[Plan], int], max_compiles: int, *, name: str, api: str) -> Plan:
  """The plan with the fewest predicted flops whose *compiled* temp is at most ``limit``.

  One chain through the verified search of ``search.py`` (the one every planner
  uses): the dynamic program's optimum, re-aimed after each compile, and the
  uniform plans; ``temp_bytes`` compiles the chain's reference step.
  """
  def start(option):
    value = int(temp_bytes(option[0]))
    return lambda: value

  found = search_lib.verified_search(
      [dp], [costs], limit, start, max_compiles, uniform=[(p,) for p in uniform_plans(costs)], name=name,
      api=api, units=exact_bytes)
  (plan,) = found.option
  label = name if found.proposed else f"{name} = {plan.made_by}"
  return dataclasses.replace(plan, made_by=label, compiled_temp_bytes=int(found.measured))


def _every_sizes(n: int) -> list[int]:
  if n <= 32:
    return list(range(1, n + 1))
  return sorted({1, 2, 3, 4, n} | {k for k in range(1, n + 1) if n % k == 0}
                | {math.ceil(math.sqrt(n)) + d for d in (-1, 0, 1)})


def min_feasible_bytes(costs: Sequence[LayerCost]) -> int:
  """The smallest predicted temp memory of any plan for ``costs`` (device only).

  Example:

    >>> from remat.segmenters import LayerCost, min_feasible_bytes
    >>> min_feasible_bytes([LayerCost(1000, 1000, 1000, 1000, 1e6, 3e6)] * 8)
    3000
  """
  return int(math.ceil(_BudgetDP(_check_costs(costs)).min_peak()))


def offload_candidates(costs: Sequence[LayerCost], offload: Any, *,
                       backend: str | None = None) -> tuple[int, ...]:
  """The boundaries whose activation the budget planner may keep in host memory.

  A boundary ``i`` (the input of layer ``i``) qualifies when an offload policy
  is given, the backend executes host offload, ``i > 0`` (the chain input is
  an argument, already held by the caller) and the activation is large enough
  to be worth a transfer (the policy's ``min_bytes``).

  Args:
    costs: the chain's per-layer costs.
    offload: the ``offload`` argument of :class:`budget` (``None``: device only).
    backend: the platform planned for; default ``jax.default_backend()``.

  Returns:
    A tuple of boundary indices (empty without offload, or on XLA:CPU).

  Example:

    >>> import remat
    >>> from remat.segmenters import LayerCost, offload_candidates
    >>> c = [LayerCost(1 << 20, 1 << 20, 1 << 20, 0, 1e9, 3e9)] * 4
    >>> offload_candidates(c, remat.offload.host(), backend="gpu")
    (1, 2, 3)
    >>> offload_candidates(c, remat.offload.host(), backend="cpu")
    ()
  """
  if offload is None:
    return ()
  offload_lib.validate_offload(offload, api="`remat.segmenters.budget`")
  if not offload_lib.supported(backend or jax.default_backend()):
    return ()
  return tuple(i for i in range(1, len(costs)) if offload.worth_moving(int(costs[i].input_bytes)))


### Budget dynamic program


@dataclasses.dataclass(frozen=True)
class _Choice:
  """One way to run the head of a sub-chain ``[i, j)``, and what it leaves to sub-problems.

  The value of a choice composes one way for every question the program asks
  (the smallest peak; the fewest flops at each budget):

  * ``floor``: byte amounts whose sum the head's own phases peak at (kept
    apart so that the frontier quantises each as before);
  * ``flops``: the head's own flops (its forward and backward, or the
    recomputing forward of a checkpoint, plus a transfer's exposed time);
  * ``inner`` / ``rest``: sub-problems ``(start, stop, free, dead)`` that run
    with ``inner_shift`` / ``rest_shift`` more bytes held (``None``: none).

  Peak: ``max(sum(floor), inner_shift + peak(inner), rest_shift + peak(rest))``.
  Flops at budget ``m``: ``flops + F(inner)[m - inner_shift] + F(rest)[m - rest_shift]``
  where ``m >= sum(floor)``, else infeasible.
  """

  code: int
  floor: tuple[float, ...]
  flops: float
  inner: tuple | None = None
  inner_shift: float = 0.0
  rest: tuple | None = None
  rest_shift: float = 0.0


class _BudgetDP:
  """min flops s.t. predicted peak <= budget, over nested trees (see ``plan.py`` cost model).

  Sub-problem ``(i, j, free, dead)``: the sub-chain ``[i, j)`` run under AD;
  ``free``: its input is already held (the chain input, or the input of an
  enclosing checkpoint); ``dead``: its output is unused (the tail of a
  recomputation), so a trailing checkpoint there runs no forward pass (XLA
  removes it). The head of ``[i, j)`` is one of (``choices``), encoded as an
  int ``code``:

  * ``-o`` (``o >= 0``): layer ``i`` taped under its ``o``-th way
    (``tapes[i][o]``: ``None`` keeps everything, else a recomputation policy).
    It keeps ``kept`` while the rest ``[i+1, j)`` runs, and peaks at its
    forward (input unless free, working set, output) or its backward (kept +
    transient + incoming cotangent).
  * ``k`` (``i < k <= j``): ``[i, k)`` checkpointed. It keeps its input (unless
    free) while the rest ``[k, j)`` runs, recomputes ``[i, k)`` with that
    sub-chain's own optimum (input free, output dead), and peaks at its
    forward without tape (``plain_peak``) on top of the input. ``k == j`` with
    a free input is excluded: that is ``[i, j)`` itself.
  * ``k + n + 1``: as ``k``, with the stored input in host memory while the
    rest runs (``offload``): the rest runs without it held, at the price of
    the transfer time the segment's forward cannot hide (``offload_cost``).

  Invariant: a sub-problem's value depends only on its key, never on who asks
  (what is held above it enters as a shift), so each is solved once, shortest
  first, and ``decode`` rebuilds a tree from the codes alone.
  """

  def __init__(self, costs, offload_boundaries=(), offload=None, backend=None):
    self.costs = costs
    self.n = len(costs)
    self.offload_boundaries = frozenset(offload_boundaries)
    self.offload = offload
    self.backend = backend
    # The ways to tape layer i: keep everything (None) or one of its measured policies.
    self.tapes = [[None] + [name for name, _ in c.policies] for c in costs]
    f = np.array([c.flops for c in costs], dtype=np.float64)
    self.prefix_flops = np.concatenate([[0.0], np.cumsum(f)])
    self._plain_peaks: dict[tuple[int, int], float] = {}
    self._min_peaks: tuple[dict, dict] | None = None
    self._choices: dict[tuple, list[_Choice]] = {}

  def plain_peak(self, i, k):
    """Peak of a forward without tape over ``[i, k)`` with its input held: the largest output
    (plus input, after the first layer) and working set."""
    if (i, k) not in self._plain_peaks:
      v = 0.0
      for t in range(i, k):
        c = self.costs[t]
        v = max(v, (0.0 if t == i else c.input_bytes) + c.output_bytes + c.forward_transient_bytes)
      self._plain_peaks[(i, k)] = v
    return self._plain_peaks[(i, k)]

  def checkpoint_keep(self, i, free):
    """What a checkpoint of ``[i, ...)`` stores: its input, unless someone holds it already."""
    return 0.0 if free else float(self.costs[i].input_bytes)

  def can_offload(self, i, k, j, free) -> bool:
    """Offloading the stored input of a checkpointed head ``[i, k)`` frees device
    memory only while a rest ``[k, j)`` runs, and only for an input not already held."""
    return (not free) and k < j and i in self.offload_boundaries

  def offload_cost(self, i, k) -> float:
    """Flop-equivalent price of keeping boundary ``i`` on host for head ``[i, k)``.

    Each way, the transfer overlaps at least the forward of ``[i, k)`` (the
    copy out runs while it computes; the copy back is issued a segment ahead
    in the backward pass); only the part that cannot hide is charged, at the
    backend's assumed compute rate. A 1-flop floor makes the planner keep a
    value on device when memory allows.
    """
    link = self.offload.link
    exposed = link.exposed_seconds(float(self.costs[i].input_bytes),
                                   self.prefix_flops[k] - self.prefix_flops[i], backend=self.backend)
    return 1.0 + exposed / link.compute_seconds(1.0, backend=self.backend)

  def choice(self, i, j, free, dead, code: int) -> _Choice:
    """The head of ``[i, j)`` that ``code`` names (see the class docstring)."""
    n = self.n
    if code <= 0:
      policy = self.tapes[i][-code]
      c = self.costs[i].under(policy)
      peak = max(forward_peak(c, not free), c.kept_bytes + backward_transient(self.costs, i, policy))
      rest = (i + 1, j, False, dead) if j > i + 1 else None
      return _Choice(code, (peak,), c.step_flops, rest=rest, rest_shift=float(c.kept_bytes))
    offloaded = code > n
    k = code - n - 1 if offloaded else code
    keep = self.checkpoint_keep(i, free)
    no_forward = dead and k == j  # output unused: no forward pass for this checkpoint
    forward = 0.0 if no_forward else self.plain_peak(i, k)
    flops = 0.0 if no_forward else self.prefix_flops[k] - self.prefix_flops[i]
    if offloaded:
      flops += self.offload_cost(i, k)
    rest = (k, j, False, dead) if k < j else None
    return _Choice(code, (keep, forward), flops, inner=(i, k, True, True), inner_shift=keep, rest=rest,
                   rest_shift=0.0 if offloaded else keep)

  def choices(self, i, j, free, dead) -> list[_Choice]:
    """Every head of ``[i, j)``, in the order ties are broken (the first wins)."""
    key = (i, j, free, dead)
    if key not in self._choices:
      self._choices[key] = self._enumerate(i, j, free, dead)
    return self._choices[key]

  def _enumerate(self, i, j, free, dead) -> list[_Choice]:
    out = [self.choice(i, j, free, dead, -o) for o in range(len(self.tapes[i]))]
    for k in range(i + 1, j + 1):
      if free and k == j:
        continue
      out.append(self.choice(i, j, free, dead, k))
      if self.can_offload(i, k, j, free):
        out.append(self.choice(i, j, free, dead, k + self.n + 1))
    return out

  def _keys(self):
    """Every sub-problem, shortest first (each needs only shorter ones)."""
    for length in range(1, self.n + 1):
      for i in range(0, self.n - length + 1):
        for free in (True, False):
          for dead in (True, False):
            yield (i, i + length, free, dead)

  def decode(self, key, code_at: Callable[[tuple, Any], int], budget: Any = 0.0,
             units: Callable[[float], Any] = float) -> list[Segment]:
    """The segments of sub-problem ``key`` from the chosen codes (``code_at(key, budget)``). Each
    sub-problem is read at the budget less what its head holds while it runs (``units`` converts
    bytes to the budget's units: the frontier's quantisation)."""
    i = key[0]
    ch = self.choice(*key, code_at(key, budget))
    rest = self.decode(ch.rest, code_at, budget - units(ch.rest_shift), units) if ch.rest else []
    if ch.inner is None:
      return [leaf(i, i + 1, policy=self.tapes[i][-ch.code])] + rest
    inner = _merge_taped(self.decode(ch.inner, code_at, budget - units(ch.inner_shift), units))
    # A checkpoint whose inside is one taped run keeps it as its child when that run has a policy
    # (a checkpoint without children tapes its layers keeping everything).
    children = tuple(inner) if len(inner) > 1 or inner[0].policy is not None else ()
    return [Segment(i, ch.inner[1], children, True, ch.code > self.n)] + rest

  def min_peak(self) -> float:
    """The smallest predicted peak of any tree (exact bytes)."""
    return self._min_peak_table()[0][(0, self.n, True, False)]

  def _min_peak_table(self):
    if self._min_peaks is None:
      peak: dict = {}
      best_code: dict = {}
      for key in self._keys():
        best = np.inf
        for ch in self.choices(*key):
          val = max(sum(ch.floor), ch.inner_shift + peak[ch.inner] if ch.inner else 0.0,
                    ch.rest_shift + peak[ch.rest] if ch.rest else 0.0)
          if val < best:
            best, best_code[key] = val, ch.code
        peak[key] = best
      self._min_peaks = (peak, best_code)
    return self._min_peaks

  def min_peak_tree(self) -> Segment:
    """A tree with the smallest predicted peak (exact, no quantisation)."""
    _, best_code = self._min_peak_table()
    root = (0, self.n, True, False)
    return Segment(0, self.n, tuple(_merge_taped(self.decode(root, lambda key, _: best_code[key]))))

  def solve(self, target: float) -> Segment:
    """The optimal tree for ``target`` bytes, certified by exact simulation."""
    n = self.n
    vals = [int(v) for c0 in self.costs for c in [c0] + [o for _, o in c0.policies]
            for v in (c.input_bytes, c.output_bytes, c.kept_bytes, c.transient_bytes)]
    g = functools.reduce(math.gcd, [v for v in vals if v > 0] or [1])
    candidates = []
    if 1 <= target / g <= 16384:  # exact integer arithmetic in units of the common divisor
      candidates.append((int(target // g) * g, int(target // g)))
    for res in (2048, 8192):
      candidates.append((target, res))
    for f in (0.99, 0.97, 0.94, 0.9, 0.85, 0.8):  # rounding overshot: aim a little lower
      candidates.append((target * f, 4096))
    for t, res in candidates:
      root = self._solve_quantized(t, res)
      if root is not None and make_plan(root, self.costs, n, "").predicted_peak_bytes <= target:
        return root
    # Within the quantisation error of the smallest peak: the exact min-peak tree.
    return self.min_peak_tree()

  def _solve_quantized(self, target, m_max):
    flops, tree_at = self.frontier(target, m_max)
    return tree_at(m_max) if np.isfinite(flops[m_max]) else None

  def frontier(self, target: float, m_max: int):
    """Min flops at every budget ``m * target / m_max`` (``m = 0 .. m_max``), and the tree at ``m``.

    Returns ``(flops, tree_at)``: an array of ``m_max + 1`` minimum flops (``inf`` where nothing
    fits) and a function from ``m`` to the root :class:`Segment` of that optimum.
    """
    unit = target / m_max
    size = m_max + 1
    budgets = np.arange(size)

    def units(b: float) -> int:  # bytes in budget units
      return int(round(b / unit))

    def shifted(arr, s: int):  # F[m - s]: the sub-problem with s units held
      if s <= 0:
        return arr
      out = np.full(size, np.inf)
      if s < size:
        out[s:] = arr[:size - s]
      return out

    flops: dict = {}
    codes: dict = {}
    for key in self._keys():
      best = np.full(size, np.inf)
      code = np.zeros(size, dtype=np.int32)
      for ch in self.choices(*key):
        val = np.full(size, ch.flops)
        if ch.inner is not None:
          val = val + shifted(flops[ch.inner], units(ch.inner_shift))
        if ch.rest is not None:
          val = val + shifted(flops[ch.rest], units(ch.rest_shift))
        val = np.where(budgets >= sum(units(b) for b in ch.floor), val, np.inf)
        better = val < best
        best = np.where(better, val, best)
        code = np.where(better, ch.code, code)
      flops[key], codes[key] = best, code

    def code_at(key, m):
      return int(codes[key][int(m)])

    def tree_at(m: int) -> Segment:
      root = (0, self.n, True, False)
      return Segment(0, self.n, tuple(_merge_taped(self.decode(root, code_at, int(m), units))))

    return flops[(0, self.n, True, False)], tree_at


def _merge_taped(segs: list[Segment]) -> list[Segment]:
  out: list[Segment] = []
  for s in segs:
    if (out and not s.checkpoint and not s.children and not out[-1].checkpoint and not out[-1].children
        and s.policy == out[-1].policy):
      out[-1] = leaf(out[-1].start, s.stop, policy=s.policy)
    else:
      out.append(s)
  return out


### Helpers


def _check_costs(costs) -> tuple[LayerCost, ...]:
  if isinstance(costs, int) or not all(isinstance(c, LayerCost) for c in costs):
    s = repr(costs)
    raise ValueError(
        f"{_API} plans from measured bytes: pass a sequence of `remat.segmenters.LayerCost` (see "
        "`remat.segmenters.measure_costs`), or use it through `remat.sequential`, which measures "
        f"them; got {s if len(s) < 80 else s[:77] + '...'}.")
  costs = tuple(costs)
  if not costs:
    raise ValueError(f"{_API} needs at least one layer, but got no costs.")
  return costs
