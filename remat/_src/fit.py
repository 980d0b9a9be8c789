"""``remat.fit``: fit a whole training step to a device's memory.

``remat.fit(step, memory)`` jits ``step`` like ``remat.jit``. Inside it, every
chain whose segmenter is ``remat.segmenters.auto()`` (in ``remat.sequential``
or the Flax ``Sequential`` s) is planned jointly so that the *compiled* step's
per-device peak (``Profile.peak_bytes``: arguments + outputs + temporaries -
donated) is at most ``memory``, with as few recomputed flops as the planner
finds. How it works, per input signature:

1. compile the step with every ``auto()`` chain plain; if it fits, done;
2. compile it with every chain at its smallest-memory plan; if that does not
   fit, nothing does (the error says what the peak is made of);
3. the two compiles calibrate the chains' predicted bytes against the step's
   per-device peak (a scale for sharding and model error, and the bytes that
   are not the chains'); the planner then searches plans against that model
   and verifies each candidate by compiling the whole step.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, ClassVar, Sequence

import jax
import numpy as np

from remat._src import budget as budget_lib
from remat._src import compile as compile_lib
from remat._src import segmenters as seg_lib
from remat._src import specs
from remat._src.plan import LayerCost, Plan, Segment, Verifier, make_plan
from remat._src.profile import Profile
from remat._src.units import format_bytes, parse_bytes

_API = "`remat.fit`"


### The segmenter


@dataclasses.dataclass(frozen=True)
class auto:  # noqa: N801 - reads as a phrase: `segmenters.auto()`
  """Plan this chain jointly with the rest of the training step, under ``remat.fit``.

  ``remat.fit(step, memory)`` chooses the plan of every ``auto()`` chain in
  ``step`` so that the compiled step fits ``memory`` per device. Outside
  ``remat.fit`` there is no memory to fit, and planning raises a
  ``ValueError`` that says so (use ``budget(max_bytes)`` to bound one chain).

  Attributes:
    policies: also choose per-layer recomputation policies (as ``budget`` does).

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> apply = remat.sequential([lambda w, x: jnp.tanh(x @ w)] * 8, remat.segmenters.auto())
    >>> step = remat.fit(jax.grad(lambda ws, x: apply(ws, x).sum()), "1MiB")
    >>> ws, x = [jnp.eye(64) * 0.5] * 8, jnp.ones((256, 64))
    >>> step.plans(ws, x).profile.peak_bytes <= 2**20
    True
  """

  policies: bool = dataclasses.field(default=True, kw_only=True)
  needs_costs: ClassVar[bool] = True

  def plan(self, costs: Sequence[LayerCost], *, verifier: Verifier | None = None) -> Plan:
    session = _ACTIVE.get()
    if session is None:
      raise ValueError(
          "`remat.segmenters.auto()` chains are planned by `remat.fit`, which fits the whole "
          "training step to a device's memory: wrap the step, e.g. `step = remat.fit(step, "
          "'16GiB')`, and call or lower that. To bound one chain's memory on its own, use "
          "`remat.segmenters.budget(max_bytes)`.")
    return session.plan(budget_lib._check_costs(costs), verifier)


### remat.fit


def fit(step: Callable, memory: int | str, *, max_compiles: int = 12, **jit_kwargs) -> Fitted:
  """Jits ``step`` and plans its ``auto()`` chains so that it fits ``memory`` per device.

  Args:
    step: the training step (a Python function, not yet jitted). Chains in it
      built with ``remat.segmenters.auto()`` are planned; everything else
      (parameters, optimizer state, the batch, other layers) counts as it is.
    memory: bytes per device: an int, a float (``1.5e9``) or a string such as
      ``"16GiB"`` or ``"80GB"``.
    max_compiles: how many compiles of the whole step the search may use (at least 2).
    **jit_kwargs: passed to ``jax.jit`` (``donate_argnums``, ``in_shardings``,
      ``static_argnums`` ...); the compiler options of ``remat.jit`` are added.

  Returns:
    A :class:`Fitted`: call it like the jitted step, ``.lower(*args)`` it, or
    ask ``.plans(*args)`` for the plans and compiled numbers. Plans are made
    once per input signature (shapes, dtypes, shardings).

  Raises:
    TypeError: if ``step`` is not callable or is already jitted.
    ValueError: if ``memory`` or ``max_compiles`` is not valid; when called,
      if nothing fits (the message gives the smallest peak and what it holds;
      a step whose arguments and outputs alone exceed ``memory`` is refused
      after one lowering, without compiling).

  Warns:
    FitWarning: when the step calls no ``auto()`` chain (nothing to plan).

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> apply = remat.sequential([lambda w, x: jnp.tanh(x @ w)] * 16, remat.segmenters.auto())
    >>> def step(ws, x):
    ...   loss, g = jax.value_and_grad(lambda ws: jnp.mean(apply(ws, x) ** 2))(ws)
    ...   return [w - 0.1 * d for w, d in zip(ws, g)], loss
    >>> fitted = remat.fit(step, 3 * 2**20, donate_argnums=0)
    >>> ws, x = [jnp.eye(128) * 0.5] * 16, jnp.ones((512, 128))
    >>> report = fitted.plans(ws, x)
    >>> report.profile.peak_bytes <= 3 * 2**20 < report.plain_profile.peak_bytes
    True
  """
  if not callable(step):
    raise TypeError(f"{_API} expects the training step function, but got {step!r}.")
  if hasattr(step, "lower"):
    raise TypeError(
        f"{_API} compiles the step itself, once per candidate plan, so it needs the Python "
        f"function, not a jitted one (got {step!r}). Pass `jax.jit`'s options to it instead: "
        "`remat.fit(step, memory, donate_argnums=(0, 1))`.")
  if not isinstance(max_compiles, int) or isinstance(max_compiles, bool) or max_compiles < 2:
    raise ValueError(f"the `max_compiles` argument to {_API} must be an int >= 2 (the plain step and "
                     f"the smallest-memory step are compiled first), but got {max_compiles!r}.")
  return Fitted(step, parse_memory(memory), max_compiles, jit_kwargs)


@dataclasses.dataclass(frozen=True)
class FitReport:
  """What ``remat.fit`` chose for one input signature, and the compiled numbers.

  Attributes:
    memory: the per-device memory the step was fitted to, in bytes.
    plans: the plan of every ``auto()`` chain, in the order the step calls them.
    profile: the compiled step with these plans (per device).
    plain_profile: the compiled step with every ``auto()`` chain plain.
    compiles: compiles of the whole step the search used.
  """

  memory: int
  plans: tuple[Plan, ...]
  profile: Profile
  plain_profile: Profile
  compiles: int

  @property
  def fits(self) -> bool:
    return self.profile.peak_bytes <= self.memory

  def __str__(self) -> str:
    p, q = self.profile, self.plain_profile
    lines = [f"remat.fit to {_fmt(self.memory)} per device: peak {_fmt(p.peak_bytes)} (arguments "
             f"{_fmt(p.argument_bytes)}, outputs {_fmt(p.output_bytes)}, donated {_fmt(p.alias_bytes)}, "
             f"temporaries {_fmt(p.temp_bytes)}); plain backprop {_fmt(q.peak_bytes)}; "
             f"{p.flops / q.flops:.3f}x its flops; {self.compiles} compile(s)"]
    for i, plan in enumerate(self.plans):
      lines.append(f"chain {i}: " + str(plan).replace("\n", "\n  "))
    return "\n".join(lines)


class FitWarning(UserWarning):
  """``remat.fit`` found nothing to plan: the step calls no ``remat.segmenters.auto()`` chain."""


class Fitted:
  """A training step jitted by :func:`fit`: call it, ``.lower`` it, or ask for its ``.plans``."""

  def __init__(self, step: Callable, memory: int, max_compiles: int, jit_kwargs: dict[str, Any]):
    self.memory = memory
    self._step = step
    self._max_compiles = max_compiles
    self._jit_kwargs = jit_kwargs
    self._jits: dict[Any, Callable] = {}
    self._reports: dict[Any, FitReport] = {}
    functools.update_wrapper(self, step)

  def __call__(self, *args, **kwargs):
    return self._jit(self.plans(*args, **kwargs).plans)(*args, **kwargs)

  def lower(self, *args, **kwargs):
    """``jax.jit(...).lower`` of the step with the fitted plans."""
    return self._jit(self.plans(*args, **kwargs).plans).lower(*args, **kwargs)

  def plans(self, *args, **kwargs) -> FitReport:
    """The plans chosen for these arguments (arrays or ``jax.ShapeDtypeStruct``), with compiled numbers."""
    key = _signature(args, kwargs)
    if key not in self._reports:
      self._reports[key] = _Search(self, args, kwargs).run()
    return self._reports[key]

  def _jit(self, plans: tuple[Plan, ...] | None) -> Callable:
    if plans not in self._jits:
      step = self._step

      @functools.wraps(step)
      def run(*args, **kwargs):
        session = _Session(plans)
        token = _ACTIVE.set(session)
        try:
          out = step(*args, **kwargs)
        finally:
          _ACTIVE.reset(token)
        if plans is not None and len(session.records) != len(plans):
          raise RuntimeError(
              f"{_API}: the step called {len(session.records)} `auto()` chain(s) where the search "
              f"saw {len(plans)}; a step must call the same chains every time it is traced.")
        self._last_session = session
        return out

      self._jits[plans] = compile_lib.jit(run, **self._jit_kwargs)
    return self._jits[plans]

  def _lower(self, plans, args, kwargs):
    """The lowered step under ``plans`` and the session its trace recorded (``None`` if cached)."""
    self._last_session = None
    return self._jit(plans).lower(*args, **kwargs), self._last_session

  def _profile(self, plans, args, kwargs) -> tuple[Profile, _Session]:
    lowered, session = self._lower(plans, args, kwargs)
    return Profile.from_compiled(lowered.compile()), session


### Implementation


_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("remat_fit", default=None)


@dataclasses.dataclass
class _Chain:
  costs: tuple[LayerCost, ...]
  key: Any


class _Session:
  """The ``auto()`` chains one trace of the step calls, and the plans they get (``None``: plain)."""

  def __init__(self, plans: tuple[Plan, ...] | None):
    self.plans = plans
    self.records: list[_Chain] = []

  def plan(self, costs: tuple[LayerCost, ...], verifier: Verifier | None) -> Plan:
    i = len(self.records)
    self.records.append(_Chain(costs, None if verifier is None else verifier.key))
    n = len(costs)
    if self.plans is None:
      return make_plan(Segment(0, n), costs, n, "auto: plain")
    if i >= len(self.plans) or self.plans[i].num_layers != n:
      raise RuntimeError(
          f"{_API}: the step's `auto()` chain {i} ({n} layers) was not seen when the step was "
          "planned; a step must call the same chains every time it is traced.")
    return self.plans[i]


class _Search:
  """The search of one input signature (see the module docstring)."""

  def __init__(self, fitted: Fitted, args, kwargs):
    self.f, self.args, self.kwargs = fitted, args, kwargs
    self.memory = fitted.memory
    self.compiles = 0
    self.undonated: int | None = None

  def compile(self, plans):
    self.compiles += 1
    return self.f._profile(plans, self.args, self.kwargs)

  def run(self) -> FitReport:
    lowered, session = self.f._lower(None, self.args, self.kwargs)
    self.refuse_if_arguments_alone_exceed(lowered)
    self.compiles += 1
    plain = Profile.from_compiled(lowered.compile())
    chains = session.records if session is not None else []
    plain_plans = tuple(make_plan(Segment(0, len(c.costs)), c.costs, len(c.costs), "auto: plain")
                        for c in chains)
    if not chains:
      warnings.warn(
          f"{_API}: the step calls no chain built with `remat.segmenters.auto()`, so there is nothing "
          "to plan: it is compiled as it is (blocks checkpointed with `remat.linen.checkpoint` or a "
          "fixed segmenter keep their own plans). To let remat.fit choose, build the chain with "
          "`remat.sequential(layers, remat.segmenters.auto())` or `remat.linen.Sequential(blocks, "
          "segmenter=remat.segmenters.auto())` (`remat.nnx.Sequential` likewise).",
          FitWarning, stacklevel=4)
    if plain.peak_bytes <= self.memory:
      return self.report(plain_plans, plain, plain)
    if not chains:
      raise ValueError(self.too_big(plain, "the step has no `remat.segmenters.auto()` chain to plan"))
    dps = [budget_lib._BudgetDP(c.costs) for c in chains]
    smallest, low = self.smallest(dps, chains)
    if low.peak_bytes > self.memory:
      raise ValueError(self.too_big(low, f"every `auto()` chain ({len(chains)}) at its smallest-memory "
                                         "plan"))
    # Calibrate: step peak = base + scale * (sum of the chains' predicted temp bytes).
    hi_pred = sum(p.predicted_peak_bytes for p in plain_plans)
    lo_pred = sum(p.predicted_peak_bytes for p in smallest)
    scale = (plain.temp_bytes - low.temp_bytes) / (hi_pred - lo_pred) if hi_pred > lo_pred else 1.0
    scale = scale if scale > 0 else 1.0
    base = plain.peak_bytes - scale * hi_pred
    known = {plain_plans: plain, **self.lows}
    if len(chains) == 1:
      plans = self.search_one(dps[0], chains[0], base, scale, known)
    else:
      plans = self.search_joint(dps, chains, base, scale, known)
    return self.report(plans, known[plans], plain)

  def smallest(self, dps, chains) -> tuple[tuple[Plan, ...], Profile]:
    """The smallest compiled step among low-memory candidates: the model's minimum, checkpoint
    every layer, and revolve(2) (the model can misjudge nested recomputation of large blocks)."""
    def plans_of(trees, label):
      return tuple(make_plan(t, c.costs, len(c.costs), label) for t, c in zip(trees, chains, strict=True))

    options = [plans_of([dp.min_peak_tree() for dp in dps], "auto: smallest predicted")]
    for seg in (seg_lib.every(1), seg_lib.revolve(2)):
      options.append(plans_of([seg.plan(len(c.costs)).root for c in chains], f"auto: {seg!r}"))
    options = list({tuple(p.root for p in o): o for o in options}.values())
    options.sort(key=lambda o: sum(p.predicted_peak_bytes for p in o))
    self.lows: dict[tuple[Plan, ...], Profile] = {}
    for plans in options:
      self.lows[plans] = self.compile(plans)[0]
      fits = min(q.peak_bytes for q in self.lows.values()) <= self.memory
      if self.compiles >= self.f._max_compiles or (fits and len(self.lows) >= 2):
        break
    best = min(self.lows, key=lambda o: self.lows[o].peak_bytes)
    return best, self.lows[best]

  def search_one(self, dp, chain, base, scale, known) -> tuple[Plan, ...]:
    """One chain: ``budget``'s verified search, with the whole step as the verifier."""
    by_root = {p[0].root: p for p in known}

    limit = int(math.floor((self.memory - base) / scale))

    def temp(plan):  # the step's peak in the chain's predicted units: <= limit iff it fits
      if plan.root not in by_root:
        plans = (plan,)
        known[plans] = self.compile(plans)[0]
        by_root[plan.root] = plans
      over = known[by_root[plan.root]].peak_bytes - self.memory
      return limit + (math.ceil(over / scale) if over > 0 else -math.floor(-over / scale))
    extra = [p for (p,) in known]  # compiled already: reused, not compiled again
    budget = self.f._max_compiles - self.compiles
    try:
      # The step's peak is calibrated at two plans only: allow larger misses than `budget` does.
      plan = budget_lib.verified_search(dp, chain.costs, limit, temp, budget, name="auto", api=_API,
                                        extra=extra, low=0.7)
    except ValueError:  # out of compiles before anything fitted: the smallest plan does (step 2)
      return min((p for p in known if known[p].peak_bytes <= self.memory), key=_flops)
    plans = (dataclasses.replace(plan, compiled_temp_bytes=None),)
    known[plans] = known[by_root[plan.root]]
    return plans

  def search_joint(self, dps, chains, base, scale, known) -> tuple[Plan, ...]:
    """Several chains share the memory: a joint frontier, re-aimed by each compiled peak, and the
    uniform plans applied to every chain as verified candidates (never worse than uniform).

    As ``budget``'s verified search, the cheapest plausible candidate is compiled first: a
    prediction is plausible if ``low`` times it fits, ``low`` the lowest compiled/predicted ratio
    seen (0.7 to start: the step is calibrated at two plans only)."""
    best = min((p for p in known if known[p].peak_bytes <= self.memory), key=_flops)
    avail = (self.memory - base) / scale
    uniform = _uniform_tuples(chains)
    low, aiming = 0.7, True

    def predicted(plans):
      return sum(p.predicted_peak_bytes or 0 for p in plans)

    while self.compiles < self.f._max_compiles:
      joint = _joint_plans(dps, chains, avail) if aiming else None
      if joint is not None and joint in known:
        joint, aiming = None, False
      options = [u for u in uniform if u not in known and low * predicted(u) <= avail]
      options += [joint] if joint is not None else []
      options = [o for o in options if _flops(o) < _flops(best)]
      if not options:
        break
      cand = min(options, key=lambda o: (_flops(o), predicted(o)))
      prof = known[cand] = self.compile(cand)[0]
      if predicted(cand) > 0:
        low = min(low, max((prof.peak_bytes - base) / scale, 0.0) / predicted(cand))
      if prof.peak_bytes <= self.memory:
        best = cand
        if cand is joint:
          if prof.peak_bytes >= 0.98 * self.memory:
            aiming = False
          avail += (self.memory - prof.peak_bytes) / scale
      elif cand is joint:
        avail -= (prof.peak_bytes - self.memory) / scale
    if best in uniform:
      labelled = tuple(dataclasses.replace(p, segmenter=f"auto = {p.segmenter}") for p in best)
      known[labelled] = known[best]
      best = labelled
    return best

  def report(self, plans, prof, plain) -> FitReport:
    return FitReport(memory=self.memory, plans=plans, profile=prof, plain_profile=plain,
                     compiles=self.compiles)

  def too_big(self, prof: Profile, what: str) -> str:
    fixed = prof.argument_bytes + prof.output_bytes - prof.alias_bytes
    return (
        f"{_API}: the step does not fit {_fmt(self.memory)} per device. The smallest peak reached is "
        f"{_fmt(prof.peak_bytes)} ({what}): arguments {_fmt(prof.argument_bytes)} (parameters, "
        f"optimizer state, batch) + outputs {_fmt(prof.output_bytes)} - donated "
        f"{_fmt(prof.alias_bytes)} = {_fmt(fixed)} held for the whole step, and temporaries "
        f"{_fmt(prof.temp_bytes)} (activations, gradients, working memory). {self.advice()}")

  def advice(self) -> str:
    """What could make the step fit: donation only where some argument is not donated yet."""
    steps = ["Lower the batch or the sequence length", "shard the step over more devices"]
    if self.undonated:
      steps.append(f"donate what the step replaces (`donate_argnums`: {self.undonated} argument "
                   "array(s) not donated have the shape of an output)")
    return ", ".join(steps) + ", or raise `memory`."

  def refuse_if_arguments_alone_exceed(self, lowered) -> None:
    """One lowering, no compile: refuses a step whose arguments and outputs alone exceed the memory.

    Arguments and outputs live for the whole step whatever is recomputed; at
    best XLA aliases a donated argument with an output. So arguments +
    outputs - donated arguments (per device: unknown layouts are counted as
    spread over every device) is a lower bound of the peak, and above
    ``memory`` no plan can help.
    """
    leaves = [x for x in jax.tree_util.tree_leaves((self.args, self.kwargs)) if hasattr(x, "shape")]
    infos = jax.tree_util.tree_leaves(getattr(lowered, "args_info", None))
    donated = [bool(getattr(i, "donated", False)) for i in infos]
    if len(donated) != len(leaves):  # static arguments or an unfamiliar jax: no early answer
      self.undonated = None
      return
    outs = jax.tree_util.tree_leaves(lowered.out_info)
    # Donation helps only where an output could reuse the argument's buffer (same shape and dtype).
    out_types = {(tuple(o.shape), str(o.dtype)) for o in outs}
    self.undonated = sum(not d and (tuple(x.shape), str(x.dtype)) in out_types
                         for x, d in zip(leaves, donated, strict=True))
    args_bytes = sum(_lower_bound_bytes(x) for x in leaves)
    out_bytes = sum(_lower_bound_bytes(x) for x in outs)
    # At most the outputs can live in donated buffers.
    donated_bytes = min(out_bytes, sum(specs.device_bytes(x)  # unknown layouts: whole, an upper bound
                                       for x, d in zip(leaves, donated, strict=True) if d))
    fixed = args_bytes + out_bytes - donated_bytes
    if fixed > self.memory:
      raise ValueError(
          f"{_API}: the step cannot fit {_fmt(self.memory)} per device: its arguments "
          f"({_fmt(args_bytes)}: parameters, optimizer state, batch) and outputs ({_fmt(out_bytes)}), "
          f"less what donation can reuse ({_fmt(donated_bytes)}), already hold {_fmt(fixed)} for the "
          "whole step, before any activation; recomputation cannot lower that (found by lowering "
          f"the step once, without compiling). {self.advice()}")


def _joint_plans(dps, chains, avail: float, m_max: int = 2048) -> tuple[Plan, ...] | None:
  """The cheapest plans whose predicted temp bytes sum to at most ``avail`` (min-plus over frontiers)."""
  if avail <= 0:
    return None
  fronts = [dp.frontier(avail, m_max) for dp in dps]
  total = fronts[0][0]
  splits = []
  for flops, _ in fronts[1:]:
    new = np.full(m_max + 1, np.inf)
    arg = np.zeros(m_max + 1, dtype=np.int64)
    for a in range(m_max + 1):
      if not np.isfinite(total[a]):
        continue
      cand = total[a] + flops[:m_max + 1 - a]
      better = cand < new[a:]
      new[a:] = np.where(better, cand, new[a:])
      arg[a:] = np.where(better, a, arg[a:])
    splits.append(arg)
    total = new
  if not np.isfinite(total[m_max]):
    return None
  ms, m = [], m_max
  for arg in reversed(splits):
    a = int(arg[m])
    ms.append(m - a)
    m = a
  ms.append(m)
  ms.reverse()
  return tuple(make_plan(tree_at(m), c.costs, len(c.costs), "auto")
               for (_, tree_at), m, c in zip(fronts, ms, chains, strict=True))


def _uniform_tuples(chains) -> list[tuple[Plan, ...]]:
  """Each uniform plan (``budget_lib.uniform_plans``) applied to every chain alike."""
  per = [{p.segmenter: p for p in budget_lib.uniform_plans(c.costs)} for c in chains]
  return [tuple(d[label] for d in per) for label in per[0] if all(label in d for d in per[1:])]


def _flops(plans) -> float:
  return sum(p.predicted_flops or 0.0 for p in plans)


def _signature(args, kwargs) -> Any:
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  key = []
  for x in leaves:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      key.append((tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None)),
                  bool(getattr(x, "weak_type", False))))
    else:
      try:
        hash(x)
        key.append((type(x).__name__, x))
      except TypeError:
        key.append((type(x).__name__, id(x)))
  return treedef, tuple(key)


def _lower_bound_bytes(x) -> float:
  """Per-device bytes of ``x``; an unknown layout counts as spread evenly over every device."""
  known = isinstance(getattr(x, "sharding", None),
                     (jax.sharding.NamedSharding, jax.sharding.SingleDeviceSharding))
  return specs.device_bytes(x) / (1 if known else jax.device_count())


def parse_memory(memory: int | float | str) -> int:
  """Bytes from an int, a float (``1.5e9``) or a string such as ``"16GiB"``, ``"80GB"``, ``"1.5e9"``."""
  if isinstance(memory, (int, np.integer)) and not isinstance(memory, bool) and memory > 0:
    return int(memory)
  if isinstance(memory, (float, np.floating)) and math.isfinite(memory) and memory >= 1:
    return int(round(float(memory)))
  if isinstance(memory, str):
    try:
      return parse_bytes(memory)
    except ValueError:
      pass
  raise ValueError(
      f"the `memory` argument to {_API} must be a positive number of bytes per device, as an int, a "
      f"float such as 1.5e9, or a string such as '16GiB', '80GB' or '1.5e9', but got {memory!r}.")


def _fmt(b: float) -> str:
  return format_bytes(int(b), exact=True)
