"""Segmenters: small hashable objects that turn a chain's costs into a :class:`Plan`.

``every(k)``, ``sqrt()``, ``multilevel(levels)`` are uniform segmentations;
``none()`` stores nothing (the quadratic extreme); ``revolve(slots)`` is
Griewank--Walther's binomial optimum for uniform chains; ``budget(max_bytes)``
is a Rotor-style dynamic program over nested segment trees that minimises
recomputed flops subject to a predicted peak memory, using per-layer costs
measured from XLA (``remat._src.costs``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import numpy as np

from remat._src.plan import LayerCost, Plan, Segment, backward_transient, leaf, make_plan

Costs = int | Sequence[LayerCost] | Sequence[float]

### Public segmenters


@dataclasses.dataclass(frozen=True)
class every:  # noqa: N801 - reads as a phrase: `segmenters.every(4)`
  """Checkpoint every ``k`` consecutive layers (the last segment may be shorter).

  Each segment keeps its input and recomputes its ``k`` layers once in the
  backward pass: ``2 * D`` forward evaluations for ``D`` layers, about
  ``D / k + k`` stored activations. ``every(1)`` is "checkpoint every block".

  Args:
    k: layers per segment, a positive int.

  Raises:
    ValueError: if ``k`` is not a positive int.

  Example:

    >>> import remat
    >>> p = remat.segmenters.every(4).plan(16)
    >>> p.forward_evaluations, p.stored_states
    (32, 6)
  """

  k: int

  def __post_init__(self):
    _check_positive_int(self.k, "k", "remat.segmenters.every", "every(4)")

  def plan(self, costs: Costs) -> Plan:
    """Returns the :class:`Plan` for a chain (a number of layers or per-layer costs)."""
    n, c = _normalize(costs, "every")
    root = Segment(0, n, tuple(leaf(i, min(i + self.k, n), True) for i in range(0, n, self.k)))
    return _finish(root, c, n, repr(self), costs)


@dataclasses.dataclass(frozen=True)
class sqrt:  # noqa: N801
  """``every(ceil(sqrt(D)))``: about ``2 sqrt(D)`` stored activations, one extra forward pass.

  Example:

    >>> import remat
    >>> remat.segmenters.sqrt().plan(64).stored_states
    14
  """

  def plan(self, costs: Costs) -> Plan:
    """Returns the :class:`Plan` for a chain (a number of layers or per-layer costs)."""
    n, c = _normalize(costs, "sqrt")
    k = max(1, math.ceil(math.sqrt(n)))
    p = every(k).plan(n if c is None else costs)
    return dataclasses.replace(p, segmenter=f"{self!r} = every({k})")


@dataclasses.dataclass(frozen=True)
class multilevel:  # noqa: N801
  """Nested checkpointing, ``levels`` deep: ``O(D^(1/(levels+1)))`` memory, ``levels+1`` extra passes.

  Each level splits its range into about ``b = ceil(D^(1/(levels+1)))``
  checkpointed segments; the innermost segments (about ``b`` layers) run
  taped. ``multilevel(1)`` is :class:`sqrt`; ``multilevel(2)`` keeps
  ``O(D^(1/3))`` activations for about ``3 D`` forward evaluations (less the
  forwards of trailing inner segments, which a recomputation does not need).

  Args:
    levels: nesting depth, a positive int.

  Raises:
    ValueError: if ``levels`` is not a positive int.

  Example:

    >>> import remat
    >>> p = remat.segmenters.multilevel(2).plan(64)
    >>> p.forward_evaluations
    176
  """

  levels: int

  def __post_init__(self):
    _check_positive_int(self.levels, "levels", "remat.segmenters.multilevel", "multilevel(2)")

  def plan(self, costs: Costs) -> Plan:
    """Returns the :class:`Plan` for a chain (a number of layers or per-layer costs)."""
    n, c = _normalize(costs, "multilevel")
    b = max(2, math.ceil(round(n ** (1.0 / (self.levels + 1)), 9)))

    def nest(start, stop, level):
      size = stop - start
      if level == 0 or size <= 1:
        return ()
      chunk = max(1, math.ceil(size / b))
      out = []
      for s in range(start, stop, chunk):
        e = min(s + chunk, stop)
        out.append(Segment(s, e, nest(s, e, level - 1), True))
      return tuple(out)

    return _finish(Segment(0, n, nest(0, n, self.levels)), c, n, repr(self), costs)


@dataclasses.dataclass(frozen=True)
class none:  # noqa: N801
  """Store nothing but the chain input: recompute every layer's input from it.

  The quadratic extreme: ``D (D + 1) / 2`` forward evaluations, one stored
  state (``revolve(1)``).

  Example:

    >>> import remat
    >>> p = remat.segmenters.none().plan(8)
    >>> p.forward_evaluations, p.stored_states
    (36, 1)
  """

  def plan(self, costs: Costs) -> Plan:
    """Returns the :class:`Plan` for a chain (a number of layers or per-layer costs)."""
    n, c = _normalize(costs, "none")
    root = Segment(0, n, tuple(_revolve_tree(n, 1, 0)))
    return _finish(root, c, n, repr(self), costs)


@dataclasses.dataclass(frozen=True)
class revolve:  # noqa: N801
  """Griewank--Walther's optimal schedule with ``slots`` stored states.

  For ``l`` uniform layers the plan makes ``l + t(l, slots)`` forward
  evaluations, the binomial optimum, and holds at most ``slots`` boundary
  activations (chain input included). It is realised by nested checkpoints
  following ``R(l, s) = min_m [m + R(l - m, s - 1) + R(m, s)]``. Per-layer
  costs only change the predicted bytes and flops, not the schedule.

  Args:
    slots: stored states, a positive int.

  Raises:
    ValueError: if ``slots`` is not a positive int.

  Example:

    >>> import remat
    >>> p = remat.segmenters.revolve(3).plan(16)
    >>> p.forward_evaluations, p.stored_states
    (49, 3)
  """

  slots: int

  def __post_init__(self):
    _check_positive_int(self.slots, "slots", "remat.segmenters.revolve", "revolve(4)")

  def plan(self, costs: Costs) -> Plan:
    """Returns the :class:`Plan` for a chain (a number of layers or per-layer costs)."""
    n, c = _normalize(costs, "revolve")
    root = Segment(0, n, tuple(_revolve_tree(n, self.slots, 0)))
    return _finish(root, c, n, repr(self), costs)


@dataclasses.dataclass(frozen=True)
class budget:  # noqa: N801
  """The plan with the fewest recomputed flops whose predicted peak fits ``max_bytes``.

  A dynamic program in the spirit of Rotor (Beaumont et al.) over nested
  segment trees: for every sub-chain it chooses, head by head, to tape a layer
  or to checkpoint a segment (store its input, recompute it with its own
  optimal inside), minimising flops subject to the predicted peak
  (``LayerCost`` bytes measured from XLA). Where plain backprop fits, the plan
  recomputes nothing. ``max_bytes`` bounds the compiled temp memory of the
  chain's training step (``remat.profile(step).temp_bytes``): activations,
  residuals and working buffers; parameters, inputs and gradients are not in
  it. Used through ``remat.sequential`` (or the Flax ``Sequential``s) the plan
  is made per traced shape and checked by compiling it; if the compiled
  program does not fit, the planner tightens its target and plans again (at
  most ``max_compiles`` compiles). The verified plan compiles to at most
  99.5% of ``max_bytes`` for that reference step (``value_and_grad`` of the
  chain's summed output with respect to parameters and input), leaving room
  for the small buffers a caller's own step adds.

  Args:
    max_bytes: the memory budget in bytes (a positive int).
    offload: a ``remat.offload.host(...)`` policy, or ``None``. With it, on a
      backend that executes host offload (``remat.offload.supported()``:
      GPU, TPU), the planner has a third choice for the stored input of each
      checkpointed segment besides keeping it on device or recomputing more
      finely: keep it in host memory (``Segment.offload``), which frees its
      device bytes at the price of a transfer each way. The transfer is
      charged only where it cannot hide behind the segment's forward compute
      (policy's ``transfer_seconds`` against ``compute_seconds``), so the
      planner prefers, in order: keep, offload, recompute. ``Plan`` reports
      ``offloaded_bytes``. On a backend that does not execute offload (XLA:CPU)
      it plans recomputation only.
    max_compiles: how many candidate plans ``remat.sequential`` may compile to
      find one that truly fits.

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
  max_compiles: int = dataclasses.field(default=4, kw_only=True)

  def __post_init__(self):
    _check_positive_int(self.max_bytes, "max_bytes", "remat.segmenters.budget", "budget(2**30)")
    _check_positive_int(self.max_compiles, "max_compiles", "remat.segmenters.budget",
                        "budget(2**30, max_compiles=4)")
    if self.offload is not None:
      from remat._src import offload as offload_lib  # policies live there

      offload_lib.validate_offload(self.offload, api="`remat.segmenters.budget`")

  def plan(self, costs: Sequence[LayerCost], *, target_bytes: int | None = None,
           backend: str | None = None) -> Plan:
    """Returns the cheapest :class:`Plan` whose predicted peak fits the budget.

    Args:
      costs: per-layer :class:`LayerCost` (``remat.segmenters.measure_costs``
        measures them from XLA).
      target_bytes: plan for this many bytes instead of ``max_bytes`` (used
        when a compiled plan overshot its prediction).
      backend: the platform to plan for (``"gpu"``, ``"tpu"``, ``"cpu"``);
        default ``jax.default_backend()``. Decides whether offload is an option.

    Returns:
      The :class:`Plan`.

    Raises:
      ValueError: if ``costs`` carry no bytes, or the budget is below the
        smallest feasible one (the message names it in bytes).
    """
    if isinstance(costs, int) or not all(isinstance(c, LayerCost) for c in costs):
      raise ValueError(
          "`remat.segmenters.budget` plans from measured bytes: pass a sequence of "
          "`remat.segmenters.LayerCost` (see `remat.segmenters.measure_costs`), or use it "
          f"through `remat.sequential`, which measures them; got {_short(costs)}.")
    costs = tuple(costs)
    if not costs:
      raise ValueError("`remat.segmenters.budget` needs at least one layer, but got no costs.")
    target = self.max_bytes if target_bytes is None else int(target_bytes)
    dp = _BudgetDP(costs, offload_candidates(costs, self.offload, backend=backend), self.offload,
                   backend=backend)
    smallest = dp.min_peak()
    if target < smallest:
      need = int(math.ceil(smallest * self.max_bytes / target))
      raise ValueError(
          f"`remat.segmenters.budget({self.max_bytes})`: no plan fits {target:,} bytes; the smallest "
          f"feasible budget for this chain is {int(math.ceil(smallest)):,} bytes (predicted). "
          f"Raise `max_bytes` to at least {need} or make the layers smaller.")
    root = dp.solve(target)
    return make_plan(root, costs, len(costs), repr(self))


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
  from remat._src import offload as offload_lib  # policies live there

  offload_lib.validate_offload(offload, api="`remat.segmenters.budget`")
  if not offload_lib.supported(backend or jax.default_backend()):
    return ()
  return tuple(i for i in range(1, len(costs)) if offload.worth_moving(int(costs[i].input_bytes)))


### Revolve (uniform chains)


@functools.lru_cache(maxsize=64)
def _revolve_table(n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
  """R[l, t] and the optimal split m for l <= n, t <= s."""
  inf = np.iinfo(np.int64).max // 4
  r = np.full((n + 1, s + 1), inf, dtype=np.int64)
  arg = np.zeros((n + 1, s + 1), dtype=np.int64)
  r[1, :] = 1
  for t in range(1, s + 1):
    for l in range(2, n + 1):
      ms = np.arange(1, l)
      vals = ms + r[l - ms, t - 1] + r[ms, t]
      j = int(np.argmin(vals))
      r[l, t], arg[l, t] = vals[j], ms[j]
  return r, arg


def revolve_evaluations(length: int, slots: int) -> int:
  """Griewank--Walther's optimum ``l + t(l, s)`` from the binomial formula (DESIGN.md fact 3)."""
  l, s = length, slots
  if l <= 1:
    return l
  r = 0
  while math.comb(s + r, s) < l:
    r += 1
  return l + r * l - math.comb(s + r, s + 1)


def _revolve_tree(n: int, s: int, offset: int) -> list[Segment]:
  _, arg = _revolve_table(n, s)
  out: list[Segment] = []
  while True:
    if n == 1:
      out.append(leaf(offset, offset + 1))
      return out
    m = int(arg[n, s])
    inner = _revolve_tree(m, s, offset) if m > 1 else []
    out.append(Segment(offset, offset + m, tuple(inner), True))
    offset, n, s = offset + m, n - m, s - 1


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
    nbytes = float(self.c[i].input_bytes)
    fwd = self.offload.compute_seconds(self.fsum[k] - self.fsum[i], backend=self.backend)
    exposed = max(0.0, self.offload.transfer_seconds(nbytes, backend=self.backend) - fwd)
    rate = 1.0 / self.offload.compute_seconds(1.0, backend=self.backend)  # flop/s
    return 1.0 + 2.0 * exposed * rate

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
            c = self.c[i]
            rest = mp[(i + 1, j, False, dead)] if j > i + 1 else 0.0
            best, best_k = max(c.kept_bytes + backward_transient(self.c, i), c.kept_bytes + rest), 0
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
      if k == 0:
        return [leaf(i, i + 1)] + (rebuild(i + 1, j, False, dead) if j > i + 1 else [])
      off = k > self.n
      k = k - self.n - 1 if off else k
      inner = _merge_taped(rebuild(i, k, True, True))
      seg = Segment(i, k, tuple(inner) if len(inner) > 1 else (), True, off)
      return [seg] + (rebuild(k, j, False, dead) if k < j else [])

    return Segment(0, self.n, tuple(_merge_taped(rebuild(0, self.n, True, False))))

  def solve(self, target: float) -> Segment:
    """The optimal tree for ``target`` bytes, certified by exact simulation."""
    n = self.n
    vals = [int(v) for c in self.c for v in (c.input_bytes, c.output_bytes, c.kept_bytes,
                                             c.transient_bytes)]
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
        ci = c[i]
        kh, ph = Q(ci.kept_bytes), Q(ci.kept_bytes + backward_transient(c, i))
        for free in (True, False):
          kc = Q(self.keep_ck(i, free))
          for dead in (True, False):
            if j == i + 1:
              best = np.where(idx >= ph, ci.step_flops, inf)
            else:
              best = np.where(idx >= ph, ci.step_flops + shift(opt[(i + 1, j, False, dead)], kh), inf)
            arg = np.zeros(M, dtype=np.int32)  # 0: taped head; k: checkpoint [i, k)
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
    if not np.isfinite(opt[(0, n, True, False)][M - 1]):
      return None
    kids = self._rebuild(0, n, True, False, M - 1, choice, Q)
    return Segment(0, n, tuple(_merge_taped(kids)))

  def _rebuild(self, i, j, free, dead, m, choice, Q):
    k = int(choice[(i, j, free, dead)][m])
    if k == 0:
      out = [leaf(i, i + 1)]
      if j > i + 1:
        out += self._rebuild(i + 1, j, False, dead, m - Q(self.c[i].kept_bytes), choice, Q)
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
    if out and not s.checkpoint and not s.children and not out[-1].checkpoint and not out[-1].children:
      out[-1] = leaf(out[-1].start, s.stop)
    else:
      out.append(s)
  return out


### Helpers


def _check_positive_int(v, name, api, example):
  if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
    raise ValueError(f"`{api}` needs a positive int `{name}`, but got {v!r}. Example: `{example}`.")


def _short(costs) -> str:
  s = repr(costs)
  return s if len(s) < 80 else s[:77] + "..."


def _normalize(costs: Costs, name: str):
  """(number of layers, per-layer LayerCost tuple or None)."""
  api = f"`remat.segmenters.{name}(...).plan`"
  if isinstance(costs, (int, np.integer)) and not isinstance(costs, bool):
    if costs < 1:
      raise ValueError(f"{api} needs at least one layer, but got {costs!r}.")
    return int(costs), None
  try:
    seq = tuple(costs)
  except TypeError:
    seq = None
  if not seq:
    raise ValueError(
        f"{api} expects a number of identical layers or a non-empty sequence of per-layer "
        f"costs (`remat.segmenters.LayerCost` or forward flops), but got {_short(costs)}.")
  if all(isinstance(c, LayerCost) for c in seq):
    return len(seq), seq
  if all(isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, bool) and c >= 0
         for c in seq):
    # Relative compute costs only: memory in units of one activation, no bytes predicted.
    return len(seq), tuple(LayerCost(1, 1, 1, 0, float(f), 3.0 * float(f)) for f in seq)
  raise ValueError(
      f"{api} expects `remat.segmenters.LayerCost` entries or non-negative numbers (forward "
      f"flops), but got {_short(costs)}.")


def _finish(root, c, n, name, original) -> Plan:
  plan = make_plan(root, c, n, name)
  if c is not None and not all(isinstance(x, LayerCost) for x in original):
    plan = dataclasses.replace(plan, predicted_peak_bytes=None)
  return plan
