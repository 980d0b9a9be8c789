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

from remat._src import offload as offload_lib
from remat._src import plan_cache
from remat._src import search as search_lib
from remat._src import segmenters as seg_lib
from remat._src.plan import (LayerCost, Plan, Segment, Verifier, backward_transient, forward_peak, leaf,
                              make_plan)
from remat._src.units import format_bytes

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
    _check_positive_int(self.max_bytes, "max_bytes", "budget(2**30)")
    _check_positive_int(self.max_compiles, "max_compiles", "budget(2**30, max_compiles=12)")
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
          f"{self._call()}: no plan is predicted to fit {_bytes(target)}; the smallest feasible budget "
          f"for this chain is {_bytes(smallest)}, predicted. Raise `max_bytes` to at least "
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
      api=api, units=_bytes)
  (plan,) = found.option
  label = name if found.proposed else f"{name} = {plan.segmenter}"
  return dataclasses.replace(plan, segmenter=label, compiled_temp_bytes=int(found.measured))


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


class _BudgetDP:
  """min flops s.t. predicted peak <= budget, over nested trees (see ``plan.py`` cost model).

  For a sub-chain ``[i, j)`` run under AD, with ``free`` meaning its input is
  already held (chain input or the input of an enclosing checkpoint), the
  head is either layer ``i`` taped (keeps ``kept_i``, peaks at
  ``kept_i + transient_i``) or a checkpointed ``[i, k)`` (keeps ``a_i`` unless
  free, runs its inside with the optimal ``[i, k)`` plan with free input); the
  rest ``[k, j)`` follows with the head's keep held:
  ``peak = max(head_peak, head_keep + rest_peak)``. ``dead`` marks a sub-chain
  whose output is unused (the tail of a recomputation): a trailing
  checkpointed head there costs no forward pass, as XLA removes it.
  """

  def __init__(self, costs, offload_boundaries=(), offload=None, backend=None):
    self.c = costs
    self.n = len(costs)
    self.offload_boundaries = frozenset(offload_boundaries)
    self.offload = offload
    self.backend = backend
    # The ways to tape layer i: keep everything (None) or one of its measured policies.
    self.tapes = [[None] + [name for name, _ in c.policies] for c in costs]
    f = np.array([c.flops for c in costs], dtype=np.float64)
    self.fsum = np.concatenate([[0.0], np.cumsum(f)])
    # Peak of a forward without tape over [i, k) with input held: max output (+ input after the first).
    self._pf = {}

  def plain_peak(self, i, k):
    key = (i, k)
    if key not in self._pf:
      v = 0.0
      for t in range(i, k):
        c = self.c[t]
        v = max(v, (0.0 if t == i else c.input_bytes) + c.output_bytes + c.forward_transient_bytes)
      self._pf[key] = v
    return self._pf[key]

  def keep_ck(self, i, free):
    return 0.0 if free else float(self.c[i].input_bytes)

  def can_offload(self, i, k, j, free, dead) -> bool:
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
    exposed = link.exposed_seconds(float(self.c[i].input_bytes), self.fsum[k] - self.fsum[i],
                                   backend=self.backend)
    return 1.0 + exposed / link.compute_seconds(1.0, backend=self.backend)

  def min_peak(self) -> float:
    """The smallest predicted peak of any tree (exact bytes)."""
    return self._min_peak_table()[0][(0, self.n, True, False)]

  def _min_peak_table(self):
    if hasattr(self, "_mp"):
      return self._mp
    n = self.n
    mp: dict = {}
    arg: dict = {}
    for length in range(1, n + 1):
      for i in range(0, n - length + 1):
        j = i + length
        for free in (True, False):
          for dead in (True, False):
            rest = mp[(i + 1, j, False, dead)] if j > i + 1 else 0.0
            best, best_k = np.inf, 0
            for o, policy in enumerate(self.tapes[i]):  # a taped head, under each policy
              c = self.c[i].under(policy)
              val = max(forward_peak(c, not free), c.kept_bytes + backward_transient(self.c, i, policy),
                        c.kept_bytes + rest)
              if val < best:
                best, best_k = val, -o
            kc = self.keep_ck(i, free)
            for k in range(i + 1, j + 1):
              if free and k == j:
                continue
              pf = 0.0 if (dead and k == j) else self.plain_peak(i, k)
              head = kc + max(pf, mp[(i, k, True, True)])
              val = head if k == j else max(head, kc + mp[(k, j, False, dead)])
              if val < best:
                best, best_k = val, k
              if self.can_offload(i, k, j, free, dead):  # the rest runs without the input held
                val = max(head, mp[(k, j, False, dead)])
                if val < best:
                  best, best_k = val, k + n + 1
            mp[(i, j, free, dead)] = best
            arg[(i, j, free, dead)] = best_k
    self._mp = (mp, arg)
    return self._mp

  def min_peak_tree(self) -> Segment:
    """A tree with the smallest predicted peak (exact, no quantisation)."""
    _, arg = self._min_peak_table()

    def rebuild(i, j, free, dead):
      k = arg[(i, j, free, dead)]
      if k <= 0:
        head = leaf(i, i + 1, policy=self.tapes[i][-k])
        return [head] + (rebuild(i + 1, j, False, dead) if j > i + 1 else [])
      off = k > self.n
      k = k - self.n - 1 if off else k
      inner = _merge_taped(rebuild(i, k, True, True))
      seg = Segment(i, k, tuple(inner) if len(inner) > 1 else (), True, off)
      return [seg] + (rebuild(k, j, False, dead) if k < j else [])

    return Segment(0, self.n, tuple(_merge_taped(rebuild(0, self.n, True, False))))

  def solve(self, target: float) -> Segment:
    """The optimal tree for ``target`` bytes, certified by exact simulation."""
    n = self.n
    vals = [int(v) for c0 in self.c for c in [c0] + [o for _, o in c0.policies]
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
      if root is not None and make_plan(root, self.c, n, "").predicted_peak_bytes <= target:
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
    n, c = self.n, self.c
    q = target / m_max
    Q = lambda b: int(round(b / q))  # noqa: E731
    inf = np.inf
    M = m_max + 1
    opt: dict = {}
    choice: dict = {}
    idx = np.arange(M)

    def shift(arr, s):
      if s <= 0:
        return arr
      out = np.full(M, inf)
      if s < M:
        out[s:] = arr[:M - s]
      return out

    for length in range(1, n + 1):
      for i in range(0, n - length + 1):
        j = i + length
        for free in (True, False):
          heads = []  # a taped head under each policy: (kept, peak, step flops)
          for policy in self.tapes[i]:
            ci = c[i].under(policy)
            peak = max(forward_peak(ci, not free), ci.kept_bytes + backward_transient(c, i, policy))
            heads.append((Q(ci.kept_bytes), Q(peak), ci.step_flops))
          kc = Q(self.keep_ck(i, free))
          for dead in (True, False):
            best = np.full(M, inf)
            arg = np.zeros(M, dtype=np.int32)  # -o: taped head under policy o; k: checkpoint [i, k)
            for o, (kh, ph, fl) in enumerate(heads):
              rest = fl if j == i + 1 else fl + shift(opt[(i + 1, j, False, dead)], kh)
              val = np.where(idx >= ph, rest, inf)
              better = val < best
              best = np.where(better, val, best)
              arg = np.where(better, -o, arg)
            for k in range(i + 1, j + 1):
              if free and k == j:
                continue
              if dead and k == j:  # output unused: no forward pass for this checkpoint
                head = shift(opt[(i, k, True, True)], kc)
              else:
                pf = Q(self.plain_peak(i, k))
                head = np.where(idx >= kc + pf,
                                self.fsum[k] - self.fsum[i] + shift(opt[(i, k, True, True)], kc), inf)
              val = head if k == j else head + shift(opt[(k, j, False, dead)], kc)
              better = val < best
              best = np.where(better, val, best)
              arg = np.where(better, k, arg)
              if self.can_offload(i, k, j, free, dead):  # the rest runs without the input held
                val = head + opt[(k, j, False, dead)] + self.offload_cost(i, k)
                better = val < best
                best = np.where(better, val, best)
                arg = np.where(better, k + n + 1, arg)
            opt[(i, j, free, dead)] = best
            choice[(i, j, free, dead)] = arg
    def tree_at(m: int) -> Segment:
      return Segment(0, n, tuple(_merge_taped(self._rebuild(0, n, True, False, int(m), choice, Q))))

    return opt[(0, n, True, False)], tree_at

  def _rebuild(self, i, j, free, dead, m, choice, Q):
    k = int(choice[(i, j, free, dead)][m])
    if k <= 0:
      policy = self.tapes[i][-k]
      out = [leaf(i, i + 1, policy=policy)]
      if j > i + 1:
        out += self._rebuild(i + 1, j, False, dead, m - Q(self.c[i].under(policy).kept_bytes), choice, Q)
      return out
    off = k > self.n
    k = k - self.n - 1 if off else k
    kc = Q(self.keep_ck(i, free))
    inner = _merge_taped(self._rebuild(i, k, True, True, m - kc, choice, Q))
    seg = Segment(i, k, tuple(inner) if len(inner) > 1 else (), True, off)
    if k == j:
      return [seg]
    return [seg] + self._rebuild(k, j, False, dead, m if off else m - kc, choice, Q)


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


def _check_positive_int(v, name, example):
  if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
    raise ValueError(f"`{_API[1:-1]}` needs a positive int `{name}`, but got {v!r}. Example: `{example}`.")


def _bytes(b) -> str:
  """``46,199,800 bytes (44.06 MiB)``: exact, then readable."""
  b = int(b)
  return f"{b:,} bytes ({format_bytes(b)})" if b >= 1024 else f"{b:,} bytes"
