"""The verified search: the cheapest plans whose *compiled* memory fits, one mechanism for every planner.

``budget`` (one chain; its reference step is compiled) and ``remat.fit`` (every
``auto()`` chain of a training step; the whole step is compiled) both search
here. An *option* is a tuple of plans, one per chain. Candidates are

* the uniform plans (``budget.uniform_plans``: plain, ``every(k)``,
  ``revolve(s)``, ``multilevel``, one policy on every layer), applied to every
  chain alike, so a uniform plan that compiles within the limit is never beaten
  by a costlier answer;
* the dynamic program's optimum for a *target* (one chain: ``_BudgetDP.solve``;
  several: the min-plus join of their frontiers), re-aimed after each of its
  compiles by the ratio of compiled to predicted bytes;
* options measured before (``measured``: free, they spend no compile).

Each round compiles the cheapest *plausible* candidate (``low`` times its
prediction fits, ``low`` the lowest compiled/predicted ratio seen) and, with
two or more workers, concurrently the cheapest candidate that fits even at the
highest ratio seen (a safe answer if the first misses). XLA's compiles release
the GIL: lowering runs here, compiling in the caller's thread pool.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import numpy as np

from remat._src.plans.plan import LayerCost, Plan, make_plan

log = logging.getLogger("remat")

Option = tuple[Plan, ...]


@dataclasses.dataclass(frozen=True)
class Found:
  """What a search found: the option, what it measured (in the limit's units), whether the
  dynamic program proposed it (else a uniform or previously measured plan), and the compiles spent."""

  option: Option
  measured: float
  proposed: bool
  compiles: int


def uniform_options(costs: Sequence[Sequence[LayerCost]], uniform_plans: Callable) -> list[Option]:
  """Each uniform plan applied to every chain alike (``uniform_plans(costs)`` per chain)."""
  per = [{p.made_by: p for p in uniform_plans(c)} for c in costs]
  return [tuple(d[label] for d in per) for label in per[0] if all(label in d for d in per[1:])]


def joint_plans(dps, costs: Sequence[Sequence[LayerCost]], avail: float, label: str,
                m_max: int = 2048) -> Option | None:
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
  return tuple(make_plan(tree_at(m), c, len(c), label)
               for (_, tree_at), m, c in zip(fronts, ms, costs, strict=True))


def predicted(option: Option) -> float:
  return float(sum(p.predicted_peak_bytes or 0 for p in option))


def flops(option: Option) -> float:
  return float(sum(p.predicted_flops or 0.0 for p in option))


def roots(option: Option) -> tuple:
  return tuple(p.root for p in option)


def describe(option: Option) -> str:
  """``every(2): 8 recomputed; auto: 3 recomputed`` -- for logs."""
  return "; ".join(f"{p.made_by or 'custom'}: {p.recomputation()}" for p in option)


def verified_search(dps, costs: Sequence[Sequence[LayerCost]], limit: float,
                    start: Callable[[Option], Callable[[], float]], max_compiles: int, *,
                    uniform: Sequence[Option], name: str, api: str, units: Callable[[float], str],
                    measured: dict[Option, float] | None = None, low: float = 0.8, high: float = 1.0,
                    workers: int = 1, close: float | None = None) -> Found:
  """The option with the fewest predicted flops whose measured value is at most ``limit``.

  Args:
    dps: one ``budget._BudgetDP`` per chain.
    costs: each chain's layer costs.
    limit: the bound, in the units of the chains' predicted temp bytes.
    start: ``start(option)`` begins measuring an option (lowers it; the compile
      may run in a thread) and returns a function that waits for its value.
    max_compiles: how many options may be started (``measured`` ones are free).
    uniform: the uniform candidates (``uniform_options``).
    name: the label of the dynamic program's plans.
    api: our API, for error messages.
    units: formats a value of ``limit``'s units for messages.
    measured: options measured before, with their values.
    low: start of the plausibility ratio (compiled/predicted was 0.84-1.2 on the
      chains of docs/facts.md, fact 12).
    high: start of the safety ratio: the second option of a round fits even if it
      compiles to ``high`` times its prediction (or the highest ratio seen).
    workers: options compiled per round.
    close: stop aiming the dynamic program higher once a fitting proposal
      measures at least this (``None``: aim until nothing cheaper is left).

  Raises:
    ValueError: if nothing is predicted to fit, or nothing measured fits.
  """
  measured = dict(measured or {})
  by_roots = {roots(o): v for o, v in measured.items()}
  smallest = sum(dp.min_peak() for dp in dps)
  fitting = [o for o, v in measured.items() if v <= limit]
  best = min(fitting, key=flops) if fitting else None
  best_proposed = False
  target, aiming, spent = float(limit), True, 0

  def propose(t: float) -> Option | None:
    if t < smallest:
      return None
    if len(dps) == 1:
      return (make_plan(dps[0].solve(t), costs[0], len(costs[0]), name),)
    return joint_plans(dps, costs, t, name)

  while spent < max_compiles:
    proposal = propose(target) if aiming else None
    options = [o for o in uniform if low * predicted(o) <= limit]
    options += [proposal] if proposal is not None else []
    unique: dict[tuple, Option] = {}
    for o in options:
      if roots(o) not in by_roots and (best is None or flops(o) < flops(best)):
        unique.setdefault(roots(o), o)
    if not unique:
      break
    ranked = sorted(unique.values(), key=lambda o: (flops(o), predicted(o)))
    batch = [ranked[0]]
    if workers > 1 and spent + 1 < max_compiles:  # and a safe one beside it
      safe = [o for o in ranked[1:] if high * predicted(o) <= limit]
      batch += safe[:1]
    waits = [(o, start(o)) for o in batch]
    spent += len(batch)
    for o, wait in waits:
      v = float(wait())
      by_roots[roots(o)] = measured[o] = v
      if predicted(o) > 0:
        low, high = min(low, v / predicted(o)), max(high, v / predicted(o))
      is_proposal = o is proposal
      log.info("%s: %s -> %s of %s (%s); predicted %s, %.4g GFLOP", api, describe(o), units(v),
               units(limit), "fits" if v <= limit else "over", units(predicted(o)), flops(o) / 1e9)
      if v <= limit:
        if best is None or flops(o) < flops(best):
          best, best_proposed = o, is_proposal
        if is_proposal:
          if close is not None and v >= close:
            aiming = False
          elif v < limit:  # memory left over: aim higher, for fewer flops
            target = target * limit / max(v, 1.0)
      elif is_proposal:  # aim lower by the model's error, at least one byte below its prediction
        target = min(target * limit / v, predicted(o) - 1.0)
  if best is None and not measured:
    need = int(math.ceil(smallest))
    raise ValueError(
        f"{api}: no plan is predicted to fit {units(limit)}; the smallest feasible budget for this "
        f"chain is {units(need)}, predicted. Raise `max_bytes` to at least {need}, or make the layers "
        "smaller.")
  if best is None:
    tried = sorted(measured.values())
    raise ValueError(
        f"{api}: no plan compiled to within {units(limit)} in {spent} compile(s); the "
        f"smallest compiled to {units(tried[0])} (the smallest predicted for this chain is "
        f"{units(int(smallest))}). Raise `max_bytes` to at least {int(tried[0])}, or `max_compiles`.")
  return Found(best, measured[best], best_proposed, spent)
