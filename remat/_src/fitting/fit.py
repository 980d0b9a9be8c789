"""``remat.fit``: fit a whole training step to a device's memory.

``remat.fit(step, memory)`` jits ``step`` like ``remat.jit``. Inside it, every
chain whose segmenter is ``remat.segmenters.auto()`` (in ``remat.sequential``
or the Flax ``Sequential`` s) is planned jointly so that the *compiled* step's
per-device peak (``Profile.peak_bytes``: arguments + outputs + temporaries -
donated) is at most ``memory``, with as few recomputed flops as the planner
finds. How it works, per input signature:

0. the plan cache (``measure/plan_cache.py``): plans stored by an earlier
   process for the same program, shapes, memory and software are lowered,
   compiled once and checked against ``memory``; a hit ends here. In a
   ``jax.distributed`` job process 0 searches (or reads the cache) and the
   others receive its plans through the job's key-value store;
1. the step is lowered with every ``auto()`` chain plain and compiled in a
   thread pool while the chains' per-layer costs are measured; if plain fits,
   done;
2. the chains' predicted temp bytes are calibrated against the plain step's
   per-device peak (the bytes that are not the chains'), and the verified
   search (``plans/search.py``) compiles candidates, two at a time where there
   are two cores: uniform plans, and the dynamic program's optimum re-aimed
   after each compile by the ratio of compiled to predicted bytes;
3. only if nothing fits within ``max_compiles``, the smallest-memory plans
   are compiled, and if none fits the error says what the peak is made of.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np

from remat._src.fitting import budget as budget_lib
from remat._src.util import compat
from remat._src.core import compile as compile_lib
from remat._src.measure import plan_cache
from remat._src.plans import search as search_lib
from remat._src.plans import segmenters as seg_lib
from remat._src.util import specs
from remat._src.plans.plan import LayerCost, Plan, Segment, Verifier, make_plan
from remat._src.measure.profile import Profile
from remat._src.util.units import exact_bytes, parse_bytes

_API = "`remat.fit`"
log = logging.getLogger("remat")
_SEARCHES = itertools.count()  # the n-th search of this process: the same n on every process of a job
_TIMEOUT_S = float(os.environ.get("REMAT_FIT_TIMEOUT", 3600))  # how long processes wait for process 0


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

  @property
  def needs_costs(self) -> bool:
    """Measured costs are needed while ``remat.fit`` searches (or outside it, to say why not);
    a step traced with chosen plans (or only to be compiled plain) plans without them."""
    session = _ACTIVE.get()
    return session is None or session.measuring

  def plan(self, chain: Sequence[LayerCost] | int, *, verifier: Verifier | None = None) -> Plan:
    session = _ACTIVE.get()
    if session is None:
      raise ValueError(
          "`remat.segmenters.auto()` chains are planned by `remat.fit`, which fits the whole "
          "training step to a device's memory: wrap the step, e.g. `step = remat.fit(step, "
          "'16GiB')`, and call or lower that. To bound one chain's memory on its own, use "
          "`remat.segmenters.budget(max_bytes)`.")
    if isinstance(chain, int) and not session.measuring:
      return session.plan(chain, None)
    return session.plan(budget_lib._check_costs(chain), verifier)


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
    raise ValueError(f"the `max_compiles` argument to {_API} must be an int >= 2 (the plain step is "
                     "compiled first, and one compile is kept for the smallest-memory step), but got "
                     f"{max_compiles!r}.")
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
    lines = [f"remat.fit to {exact_bytes(self.memory)} per device: peak {exact_bytes(p.peak_bytes)} "
             f"(arguments {exact_bytes(p.argument_bytes)}, outputs {exact_bytes(p.output_bytes)}, donated "
             f"{exact_bytes(p.alias_bytes)}, temporaries {exact_bytes(p.temp_bytes)}); plain backprop "
             f"{exact_bytes(q.peak_bytes)}; "
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
    self._executables: dict[Any, Any] = {}
    functools.update_wrapper(self, step)

  def __call__(self, *args, **kwargs):
    key = _signature(args, kwargs)
    report = self._plans(key, args, kwargs)
    compiled = self._executables.get(key)
    if compiled is not None and not self._jit_kwargs.get("static_argnums") and not self._jit_kwargs.get(
        "static_argnames"):
      return compiled(*args, **kwargs)  # the executable the search compiled
    return self._jit(report.plans)(*args, **kwargs)

  def lower(self, *args, **kwargs):
    """``jax.jit(...).lower`` of the step with the fitted plans; its ``compile()`` returns the
    executable the search compiled (no second compile)."""
    key = _signature(args, kwargs)
    report = self._plans(key, args, kwargs)
    return _Lowered(self._jit(report.plans).lower(*args, **kwargs), self._executables.get(key))

  def plans(self, *args, **kwargs) -> FitReport:
    """The plans chosen for these arguments (arrays or ``jax.ShapeDtypeStruct``), with compiled numbers."""
    return self._plans(_signature(args, kwargs), args, kwargs)

  def _plans(self, key, args, kwargs) -> FitReport:
    if key not in self._reports:
      search = _Search(self, args, kwargs)
      self._reports[key] = report = search.run()
      self._executables[key] = search.executables.get(search_lib.roots(report.plans))
    return self._reports[key]

  def _jit(self, plans: tuple[Plan, ...] | None, measuring: bool = False) -> Callable:
    if (plans, measuring) not in self._jits:
      step = self._step

      @functools.wraps(step)
      def run(*args, **kwargs):
        session = _Session(plans, measuring)
        token = _ACTIVE.set(session)
        try:
          out = step(*args, **kwargs)
        finally:
          _ACTIVE.reset(token)
        if plans is not None and len(session.records) != len(plans):
          raise RuntimeError(
              f"{_API}: the step called {len(session.records)} `auto()` chain(s) where the search "
              f"saw {len(plans)}; a step must call the same chains every time it is traced.")
        traced = _TRACED.get()
        if traced is not None:  # `_lower` / `_measure_chains` asked for what this trace recorded
          traced.append(session)
        return out

      self._jits[(plans, measuring)] = compile_lib.jit(run, **self._jit_kwargs)
    return self._jits[(plans, measuring)]

  def _lower(self, plans, args, kwargs):
    """The lowered step under ``plans`` and the session its trace recorded (``None`` if jax reused
    an earlier trace)."""
    traced: list[_Session] = []
    token = _TRACED.set(traced)
    try:
      lowered = self._jit(plans).lower(*args, **kwargs)
    finally:
      _TRACED.reset(token)
    return lowered, traced[-1] if traced else None

  def _measure_chains(self, args, kwargs) -> _Session:
    """Traces the step (no lowering, no compile) with its chains' costs measured."""
    traced: list[_Session] = []
    token = _TRACED.set(traced)
    try:
      self._jit(None, measuring=True).trace(*args, **kwargs)
    finally:
      _TRACED.reset(token)
    return traced[-1]



class _Lowered:
  """``jax.stages.Lowered`` whose ``compile()`` (without options) is the search's executable."""

  def __init__(self, lowered, compiled):
    self._lowered, self._compiled = lowered, compiled

  def compile(self, *args, **kwargs):
    if self._compiled is not None and not args and not kwargs:
      return self._compiled
    return self._lowered.compile(*args, **kwargs)

  def __getattr__(self, name: str):
    return getattr(self._lowered, name)


### Implementation


_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("remat_fit", default=None)
# Where a trace started by `Fitted._lower` puts its session (the step returns only its outputs).
_TRACED: contextvars.ContextVar[list | None] = contextvars.ContextVar("remat_fit_traced", default=None)


@dataclasses.dataclass
class _Chain:
  costs: tuple[LayerCost, ...] | None  # None: recorded without measuring
  key: Any
  num_layers: int


class _Session:
  """The ``auto()`` chains one trace of the step calls, and the plans they get (``None``: plain).

  ``measuring``: the chains' costs are measured (the search's plain trace); otherwise chains are
  recorded by their length only and nothing is measured.
  """

  def __init__(self, plans: tuple[Plan, ...] | None, measuring: bool = False):
    self.plans = plans
    self.measuring = measuring and plans is None
    self.records: list[_Chain] = []

  def plan(self, costs: tuple[LayerCost, ...] | int, verifier: Verifier | None) -> Plan:
    i = len(self.records)
    n = costs if isinstance(costs, int) else len(costs)
    self.records.append(_Chain(None if isinstance(costs, int) else costs,
                               None if verifier is None else verifier.key, n))
    if self.plans is None:
      return make_plan(Segment(0, n), None if isinstance(costs, int) else costs, n, "auto: plain")
    if i >= len(self.plans) or self.plans[i].num_layers != n:
      raise RuntimeError(
          f"{_API}: the step's `auto()` chain {i} ({n} layers) was not seen when the step was "
          "planned; a step must call the same chains every time it is traced.")
    return self.plans[i]


class _Search:
  """The search of one input signature (see the module docstring).

  Lowering (tracing) runs in this thread; compiles run in a thread pool of
  ``_workers()`` threads (XLA releases the GIL while it compiles), so the
  plain step and the smallest-memory step compile together, and each round of
  the verified search compiles its cheapest plausible candidate beside a safe
  one. Every compiled executable is kept until the search ends; the chosen
  one is the step's (``Fitted.__call__`` does not compile it again).
  """

  def __init__(self, fitted: Fitted, args, kwargs):
    self.fitted, self.args, self.kwargs = fitted, args, kwargs
    self.memory = fitted.memory
    self.compiles = 0
    self.undonated: int | None = None
    self.fixed_bytes = 0.0
    self.executables: dict[tuple, Any] = {}
    self.programs: dict[tuple, str] = {}  # the hash of each lowered program, by its plans' roots
    self.started = time.perf_counter()

  def start(self, plans, label: str = ""):
    """Lowers the step under ``plans`` here and compiles it in the pool; returns a waiter for its Profile."""
    lowered, _ = self.fitted._lower(plans, self.args, self.kwargs)
    return self.submit(lowered, plans, label)

  def submit(self, lowered, plans, label: str = ""):
    self.programs[None if plans is None else search_lib.roots(plans)] = _program_hash(lowered)
    self.compiles += 1
    n = self.compiles
    what = label or (search_lib.describe(plans) if plans else "plain")
    log.info("%s: compile %d (%s) started at %.1f s", _API, n, what, time.perf_counter() - self.started)
    future = self.pool.submit(lowered.compile)

    def wait() -> Profile:
      compiled = future.result()
      prof = Profile.from_compiled(compiled)
      self.executables[None if plans is None else search_lib.roots(plans)] = compiled
      log.info("%s: compile %d (%s): peak %s of %s (%s), %.4g GFLOP, at %.1f s", _API, n, what,
               exact_bytes(prof.peak_bytes), exact_bytes(self.memory),
               "fits" if prof.peak_bytes <= self.memory else "over",
               prof.flops / 1e9, time.perf_counter() - self.started)
      return prof
    return wait

  def run(self) -> FitReport:
    """The plan cache first; else the search. In a ``jax.distributed`` job, process 0 does that and
    hands its plans to the others through the job's key-value store; they compile only those."""
    material = self.material()
    client = compat.distributed_client() if jax.process_count() > 1 else None
    if jax.process_count() > 1 and client is None:
      compat.warn_once("fit-kv", f"{_API}: this jax has no distributed key-value store here, so every "
                       "process searches on its own (each reads the plan cache first).")
    slot = f"remat/fit/{next(_SEARCHES)}"
    with concurrent.futures.ThreadPoolExecutor(_workers(), thread_name_prefix="remat-fit") as self.pool:
      try:
        if client is not None and jax.process_index() != 0:
          return self.receive(client, slot, material)
        try:
          report = self.from_cache(material)
          if report is None:
            report = self._run()
            plan_cache.store("fit", material, self.entry(report))
        except Exception as e:
          if client is not None:  # the other processes raise too, instead of waiting
            client.key_value_set(slot, json.dumps({"error": f"{type(e).__name__}: {e}"}))
          raise
        if client is not None:
          client.key_value_set(slot, json.dumps({"material": plan_cache.key("fit", material)[0],
                                                 **self.entry(report)}))
        return report
      finally:
        self.pool.shutdown(wait=True, cancel_futures=True)

  def material(self) -> dict[str, Any]:
    """What decides the plans besides the environment (``plan_cache.environment``)."""
    step = self.fitted._step
    return {"step": f"{getattr(step, '__module__', '')}.{getattr(step, '__qualname__', type(step).__name__)}",
            "signature": _portable_signature(self.args, self.kwargs), "memory": self.memory,
            "max_compiles": self.fitted._max_compiles, "jit": repr(sorted(self.fitted._jit_kwargs.items()))}

  def entry(self, report: FitReport) -> dict[str, Any]:
    return {"program": self.programs[search_lib.roots(report.plans)],
            "plans": [plan_cache.encode_plan(p) for p in report.plans],
            "profile": plan_cache.encode_profile(report.profile),
            "plain_profile": plan_cache.encode_profile(report.plain_profile), "compiles": report.compiles}

  def from_cache(self, material) -> FitReport | None:
    value = plan_cache.load("fit", material)
    if value is None:
      return None
    try:
      plans = tuple(plan_cache.decode_plan(p) for p in value["plans"])
      plain = plan_cache.decode_profile(value["plain_profile"])
      program = str(value["program"])
    except (KeyError, TypeError, ValueError) as e:
      plan_cache.warn_unusable("fit", material, f"does not decode ({type(e).__name__}: {e})")
      return None
    report, why = self.compile_given(plans, program, plain)
    if report is None:
      log.info("%s: the cached plans are not used (%s); searching", _API, why)
    return report

  def compile_given(self, plans, program: str, plain: Profile) -> tuple[FitReport | None, str]:
    """Compiles the step under ``plans`` (made elsewhere) if it is the program they were made for."""
    lowered, _ = self.fitted._lower(plans, self.args, self.kwargs)
    if _program_hash(lowered) != program:
      return None, "the step's program is not the one they were made for"
    prof = self.submit(lowered, plans, "cached plans")()
    if prof.peak_bytes > self.memory:
      return None, f"the step compiles to {exact_bytes(prof.peak_bytes)}, over {exact_bytes(self.memory)}"
    return self.report(plans, prof, plain), ""

  def receive(self, client, slot: str, material) -> FitReport:
    me = jax.process_index()
    log.info("%s: process %d waits for process 0's plans (%s)", _API, me, slot)
    try:
      payload = json.loads(client.blocking_key_value_get(slot, int(_TIMEOUT_S * 1000)))
    except Exception as e:
      raise RuntimeError(f"{_API}: process {me} waited {_TIMEOUT_S:.0f} s for process 0's plans ({slot}) "
                         f"and got none ({type(e).__name__}: {e}). Every process must call the fitted "
                         "step with the same shapes, in the same order.") from e
    if "error" in payload:
      raise ValueError(f"{_API}: process 0 failed to plan the step: {payload['error']}")
    if payload.get("material") != plan_cache.key("fit", material)[0]:
      raise ValueError(
          f"{_API}: process {me} traced a different step than process 0 (other shapes, shardings, "
          f"memory or software: {_portable_signature(self.args, self.kwargs)[:300]}). Every process of "
          "a jax.distributed job must call the fitted step with the same global shapes and options.")
    plans = tuple(plan_cache.decode_plan(p) for p in payload["plans"])
    report, why = self.compile_given(plans, payload["program"], plan_cache.decode_profile(
        payload["plain_profile"]))
    if report is None:
      raise ValueError(f"{_API}: process {me} cannot use process 0's plans: {why}. Every process must "
                       "trace the same step.")
    return report

  def _run(self) -> FitReport:
    # The plain step is lowered without measuring anything and compiles while the chains' costs
    # are measured (a second trace, in this thread).
    lowered, session = self.fitted._lower(None, self.args, self.kwargs)
    self.refuse_if_arguments_alone_exceed(lowered)
    wait_plain = self.submit(lowered, None, "plain")
    chains = self.fitted._measure_chains(self.args, self.kwargs).records if session.records else []
    plain_plans = tuple(make_plan(Segment(0, len(c.costs)), c.costs, len(c.costs), "auto: plain")
                        for c in chains)
    plain = wait_plain()
    if not chains:
      warnings.warn(
          f"{_API}: the step calls no chain built with `remat.segmenters.auto()`, so there is nothing "
          "to plan: it is compiled as it is (blocks checkpointed with `remat.linen.checkpoint` or a "
          "fixed segmenter keep their own plans). To let remat.fit choose, build the chain with "
          "`remat.sequential(layers, remat.segmenters.auto())` or `remat.linen.Sequential(blocks, "
          "segmenter=remat.segmenters.auto())` (`remat.nnx.Sequential` likewise).",
          FitWarning, stacklevel=5)
    self.executables[search_lib.roots(plain_plans)] = self.executables.pop(None)
    self.programs[search_lib.roots(plain_plans)] = self.programs.pop(None)
    if plain.peak_bytes <= self.memory:
      return self.report(plain_plans, plain, plain)
    if not chains:
      raise ValueError(self.too_big(plain, "the step has no `remat.segmenters.auto()` chain to plan"))
    known = {plain_plans: plain}
    costs = [c.costs for c in chains]
    # The step's peak is modelled as base + (the chains' predicted temp bytes), calibrated at plain;
    # the search's plausibility ratios absorb the model's error (and a sharded chain's scale).
    base = plain.peak_bytes - search_lib.predicted(plain_plans)
    limit = self.memory - base

    def start(plans):
      wait = self.start(plans)

      def value():
        known[plans] = wait()
        return known[plans].peak_bytes - base
      return value

    compiles_left = self.fitted._max_compiles - self.compiles - 1  # one kept for the smallest step
    if compiles_left < 1:
      return self.report(*self.smallest(chains, known), plain)
    try:
      found = search_lib.verified_search(
          [budget_lib._BudgetDP(c) for c in costs], costs, limit, start, compiles_left,
          uniform=search_lib.uniform_options(costs, budget_lib.uniform_plans), name="auto", api=_API,
          units=exact_bytes, measured={plain_plans: plain.peak_bytes - base}, low=0.7, high=1.2,
          workers=_workers(), close=limit - 0.02 * self.memory)
    except ValueError:  # nothing fitted within the compiles: is anything small enough at all?
      return self.report(*self.smallest(chains, known), plain)
    best = found.option
    if not found.proposed:
      best = tuple(dataclasses.replace(p, made_by=f"auto = {p.made_by}") for p in best)
      self.executables[search_lib.roots(best)] = self.executables[search_lib.roots(found.option)]
      self.programs[search_lib.roots(best)] = self.programs[search_lib.roots(found.option)]
    return self.report(best, known[found.option], plain)

  def smallest(self, chains, known) -> tuple[tuple[Plan, ...], Profile]:
    """The low-memory candidates, smallest prediction first, until one fits; raises if none does."""
    for plans in self.low_options(chains):
      if plans not in known:
        known[plans] = self.start(plans)()
      if known[plans].peak_bytes <= self.memory:
        return plans, known[plans]
    low = min(known, key=lambda o: known[o].peak_bytes)
    raise ValueError(self.too_big(known[low], f"every `auto()` chain ({len(chains)}) at its "
                                              "smallest-memory plan"))

  def low_options(self, chains) -> list[tuple[Plan, ...]]:
    """Low-memory candidates, smallest prediction first: the model's minimum, checkpoint every
    layer, and revolve(2) (the model can misjudge nested recomputation of large blocks)."""
    def plans_of(trees, label):
      return tuple(make_plan(t, c.costs, len(c.costs), label) for t, c in zip(trees, chains, strict=True))

    options = [plans_of([budget_lib._BudgetDP(c.costs).min_peak_tree() for c in chains],
                        "auto: smallest predicted")]
    for seg in (seg_lib.every(1), seg_lib.revolve(2)):
      options.append(plans_of([seg.plan(len(c.costs)).root for c in chains], f"auto: {seg!r}"))
    options = list({search_lib.roots(o): o for o in options}.values())
    options.sort(key=search_lib.predicted)
    return options

  def report(self, plans, prof, plain) -> FitReport:
    return FitReport(memory=self.memory, plans=plans, profile=prof, plain_profile=plain,
                     compiles=self.compiles)

  def too_big(self, prof: Profile, what: str) -> str:
    fixed = prof.argument_bytes + prof.output_bytes - prof.alias_bytes
    return (
        f"{_API}: the step does not fit {exact_bytes(self.memory)} per device. The smallest peak reached is "
        f"{exact_bytes(prof.peak_bytes)} ({what}): arguments {exact_bytes(prof.argument_bytes)} (parameters, "
        f"optimizer state, batch) + outputs {exact_bytes(prof.output_bytes)} - donated "
        f"{exact_bytes(prof.alias_bytes)} = {exact_bytes(fixed)} held for the whole step, and temporaries "
        f"{exact_bytes(prof.temp_bytes)} (activations, gradients, working memory). {self.advice()}")

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
    fixed = self.fixed_bytes = args_bytes + out_bytes - donated_bytes
    if fixed > self.memory:
      raise ValueError(
          f"{_API}: the step cannot fit {exact_bytes(self.memory)} per device: its arguments "
          f"({exact_bytes(args_bytes)}: parameters, optimizer state, batch) and outputs "
          f"({exact_bytes(out_bytes)}), less what donation can reuse ({exact_bytes(donated_bytes)}), already "
          f"hold {exact_bytes(fixed)} for the "
          "whole step, before any activation; recomputation cannot lower that (found by lowering "
          f"the step once, without compiling). {self.advice()}")


def _program_hash(lowered) -> str:
  """Identifies a lowered step: the hash of its StableHLO text."""
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _portable_signature(args, kwargs) -> str:
  """``_signature`` as text that is the same in every process (no object ids)."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  parts = [str(treedef)]
  for x in leaves:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      sharding, weak = getattr(x, "sharding", None), getattr(x, "weak_type", False)
      parts.append(f"{tuple(x.shape)}:{x.dtype}:{sharding}:{weak}")
    else:
      parts.append(f"{type(x).__name__}:{x!r}"[:200])
  return "|".join(parts)


def _workers() -> int:
  """Compiles run at once: two where the machine has two cores (XLA's own compile uses about 1.5)."""
  return 2 if (os.cpu_count() or 1) >= 2 else 1


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
