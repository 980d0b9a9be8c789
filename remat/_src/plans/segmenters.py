"""Segmenters: small frozen objects that turn a chain's costs into a :class:`Plan`.

Every segmenter follows the :class:`Segmenter` protocol. ``every(k)``,
``sqrt()``, ``multilevel(levels)`` are uniform segmentations; ``none()``
stores nothing (the quadratic extreme); ``revolve(slots)`` is
Griewank--Walther's binomial optimum. ``budget(max_bytes)`` (``budget.py``)
plans from costs measured by XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np

from remat._src.plans.plan import LayerCost, Plan, Segment, Verifier, leaf, make_plan

Chain = int | Sequence[LayerCost] | Sequence[float]
"""What a segmenter plans for: a number of identical layers, per-layer :class:`LayerCost` s, or
per-layer forward flops (relative compute only)."""

_MISSING = object()


def _chain_argument(method):
  """``plan(costs=...)``, the argument's name before it was ``chain``, still works (deprecated):
  the argument may be a number of layers, not costs."""

  @functools.wraps(method)
  def plan(self, chain=_MISSING, *, costs=_MISSING, **options):
    if costs is not _MISSING:
      if chain is not _MISSING:
        raise TypeError(f"`{self!r}.plan` got the chain twice: pass it once, as `plan(chain)`.")
      warnings.warn(f"`{self!r}.plan(costs=...)` is now `plan(chain=...)` (a number of layers or "
                    "per-layer costs).", DeprecationWarning, stacklevel=2)
      chain = costs
    if chain is _MISSING:
      raise TypeError(f"`{self!r}.plan` needs the chain: a number of layers or per-layer costs, "
                      "e.g. `plan(12)`.")
    return method(self, chain, **options)

  return plan


@runtime_checkable
class Segmenter(Protocol):
  """What a segmenter is: ``plan(chain)`` returns a :class:`Plan` for a chain.

  Attributes:
    needs_costs: ``True`` when ``plan`` needs measured :class:`LayerCost` s
      (``budget``); otherwise the number of layers is enough, and costs only
      fill in the predicted bytes and flops.
    policies: ``True`` when ``plan`` also chooses per-layer recomputation
      policies, so the costs must include each layer's policy menu.

  ``plan(chain, *, verifier=None)`` takes a number of layers or per-layer
  costs (:data:`Chain`; ``budget`` needs measured costs); a :class:`Verifier`
  lets a segmenter check candidate plans against the compiler
  (``remat.sequential`` passes one; uniform segmenters ignore it).
  """

  needs_costs: bool
  policies: bool

  def plan(self, chain: Chain, *, verifier: Verifier | None = None) -> Plan: ...


def check_segmenter(obj, api: str, num_layers: int | None = None) -> None:
  """Raises unless ``obj`` is a :class:`Segmenter` or a :class:`Plan` (for ``num_layers`` layers)."""
  if isinstance(obj, Plan):
    if num_layers is not None and obj.num_layers != num_layers:
      raise ValueError(f"{api}: the plan is for {obj.num_layers} layers but the chain has {num_layers}; "
                       f"make the plan for this chain (`segmenter.plan({num_layers})`).")
    return
  if not isinstance(obj, Segmenter):
    hint = ""
    if isinstance(obj, str):
      hint = f" Segmenters are objects: write `remat.segmenters.{obj.split(':')[0]}(...)`."
    elif isinstance(obj, type):
      hint = f" You passed the class itself; create one: `{obj.__name__}(...)`."
    raise TypeError(
        f"{api} expects a segmenter such as `remat.segmenters.every(4)` or "
        f"`remat.segmenters.budget(2**30)`, or a `remat.Plan`, but got {obj!r}.{hint}")


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
    check_positive_int(self.k, "k", "remat.segmenters.every", "every(4)")

  needs_costs: ClassVar[bool] = False
  policies: ClassVar[bool] = False

  @_chain_argument
  def plan(self, chain: Chain, *, verifier: Verifier | None = None) -> Plan:
    """The :class:`Plan` for a chain: a number of layers or per-layer costs."""
    n, c = _normalize(chain, "every")
    root = Segment(0, n, tuple(leaf(i, min(i + self.k, n), True) for i in range(0, n, self.k)))
    return _finish(root, c, n, repr(self), chain)


@dataclasses.dataclass(frozen=True)
class sqrt:  # noqa: N801
  """``every(ceil(sqrt(D)))``: about ``2 sqrt(D)`` stored activations, one extra forward pass.

  Example:

    >>> import remat
    >>> remat.segmenters.sqrt().plan(64).stored_states
    14
  """

  needs_costs: ClassVar[bool] = False
  policies: ClassVar[bool] = False

  @_chain_argument
  def plan(self, chain: Chain, *, verifier: Verifier | None = None) -> Plan:
    """The :class:`Plan` for a chain: a number of layers or per-layer costs."""
    n, c = _normalize(chain, "sqrt")
    k = max(1, math.ceil(math.sqrt(n)))
    p = every(k).plan(n if c is None else chain)
    return dataclasses.replace(p, made_by=f"{self!r} = every({k})")


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
    check_positive_int(self.levels, "levels", "remat.segmenters.multilevel", "multilevel(2)")

  needs_costs: ClassVar[bool] = False
  policies: ClassVar[bool] = False

  @_chain_argument
  def plan(self, chain: Chain, *, verifier: Verifier | None = None) -> Plan:
    """The :class:`Plan` for a chain: a number of layers or per-layer costs."""
    n, c = _normalize(chain, "multilevel")
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

    return _finish(Segment(0, n, nest(0, n, self.levels)), c, n, repr(self), chain)


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

  needs_costs: ClassVar[bool] = False
  policies: ClassVar[bool] = False

  @_chain_argument
  def plan(self, chain: Chain, *, verifier: Verifier | None = None) -> Plan:
    """The :class:`Plan` for a chain: a number of layers or per-layer costs."""
    n, c = _normalize(chain, "none")
    root = Segment(0, n, tuple(_revolve_tree(n, 1, 0)))
    return _finish(root, c, n, repr(self), chain)


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
    check_positive_int(self.slots, "slots", "remat.segmenters.revolve", "revolve(4)")

  needs_costs: ClassVar[bool] = False
  policies: ClassVar[bool] = False

  @_chain_argument
  def plan(self, chain: Chain, *, verifier: Verifier | None = None) -> Plan:
    """The :class:`Plan` for a chain: a number of layers or per-layer costs."""
    n, c = _normalize(chain, "revolve")
    root = Segment(0, n, tuple(_revolve_tree(n, self.slots, 0)))
    return _finish(root, c, n, repr(self), chain)


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
  """Griewank--Walther's optimum ``l + t(l, s)`` from the binomial formula (docs/facts.md, fact 3).

  Example:

    >>> import remat
    >>> remat.segmenters.revolve_evaluations(16, 3)
    49
  """
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


### Helpers


def check_positive_int(v, name, api, example):
  """A segmenter's whole-number option (``every(k)``, ``budget(max_bytes)`` ...), named in the error."""
  if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
    raise ValueError(f"`{api}` needs a positive int `{name}`, but got {v!r}. Example: `{example}`.")


def _short(costs) -> str:
  s = repr(costs)
  return s if len(s) < 80 else s[:77] + "..."


def _normalize(costs: Chain, name: str):
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
