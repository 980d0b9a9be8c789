"""Segmenters and plans as data: schedule counts, the revolve optimum, the budget DP vs brute force."""

import dataclasses
import math

import hypothesis
import hypothesis.strategies as st
import pytest

import error_cases
import remat
from remat import segmenters as S
from remat.segmenters import Plan, Segment


# -- revolve: Griewank-Walther's binomial optimum --------------------------------

def binomial_t(l, s):
  """t(l, s) from docs/facts.md, fact 3, written out independently of the library."""
  r = 0
  while math.comb(s + r, s) < l:
    r += 1
  return r * l - math.comb(s + 1 + r - 1, s + 1)


def test_revolve_table_is_the_binomial_optimum():
  for s in range(1, 9):
    for l in range(1, 65):
      p = S.revolve(s).plan(l)
      assert p.forward_evaluations == l + binomial_t(l, s), (l, s)
      assert p.stored_states <= s, (l, s)
      assert p.num_layers == l


def test_revolve_uses_its_slots_when_they_help():
  # More slots never cost more, and with enough of them each layer is recomputed once.
  for l in (8, 33, 64):
    evals = [S.revolve(s).plan(l).forward_evaluations for s in range(1, 9)]
    assert evals == sorted(evals, reverse=True)
  assert S.revolve(64).plan(64).forward_evaluations == 2 * 64 - 1


# -- uniform segmenters ------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 7, 16, 64])
def test_none_is_quadratic_with_one_state(d):
  p = S.none().plan(d)
  assert p.forward_evaluations == d * (d + 1) // 2
  assert p.stored_states == (1 if d > 1 else 0)  # a single layer is only the working state


@pytest.mark.parametrize("d,k", [(16, 4), (16, 1), (17, 4), (64, 8), (5, 10)])
def test_every_k(d, k):
  p = S.every(k).plan(d)
  assert p.forward_evaluations == 2 * d
  nseg = math.ceil(d / k)
  last = d - (nseg - 1) * k
  # All segment inputs after the forward; in the backward of segment j, the
  # inputs of segments 0..j plus the taped inputs of segment j, less the
  # working state.
  want = max(nseg, nseg + last - 2, nseg + k - 3 if nseg > 1 else 0)
  assert p.stored_states == want
  assert len(p.root.children) == nseg and all(c.checkpoint for c in p.root.children)


def test_sqrt_and_multilevel_scale():
  assert S.sqrt().plan(64).stored_states == 14          # 8 + 8 - 2
  assert S.sqrt().plan(64).forward_evaluations == 128
  p2 = S.multilevel(2).plan(64)                          # 4 x 4 x 4
  assert p2.stored_states <= 10 and p2.stored_states < S.sqrt().plan(64).stored_states
  # Three forward passes less the dead forwards of the last inner segment of
  # each recomputed outer segment.
  assert p2.forward_evaluations == 3 * 64 - 4 * 4
  assert S.multilevel(1).plan(49).root == S.sqrt().plan(49).root
  # O(D^(1/3)): the stored states grow far slower than sqrt's.
  assert S.multilevel(2).plan(512).stored_states <= 3 * 8
  assert S.sqrt().plan(512).stored_states >= 40


def test_plan_str_shows_the_nesting():
  text = str(S.revolve(2).plan(6))
  assert text.splitlines()[0].startswith("Plan(revolve(slots=2), 6 layers): 14 forward evaluations")
  assert "  checkpoint [0, 3)" in text and "      checkpoint [0]" in text and "tape [5]" in text


def test_segmenters_are_hashable_frozen_and_comparable():
  segs = [S.every(4), S.sqrt(), S.multilevel(2), S.revolve(3), S.budget(1 << 20), S.none()]
  assert len({*segs, S.every(4)}) == len(segs)
  with pytest.raises(dataclasses.FrozenInstanceError):
    segs[0].k = 3
  assert S.budget(10, offload=remat.offload.host()).offload == remat.offload.host()
  hash(S.every(4).plan(8))


def test_per_layer_flops_give_predicted_flops_but_no_bytes():
  p = S.every(2).plan([1.0, 2.0, 3.0, 4.0])
  assert p.predicted_peak_bytes is None
  # Each layer: taped forward+backward (3x) plus one recomputation (1x).
  assert p.predicted_flops == pytest.approx(3 * 10 + 10)


ERROR_CASES = {
    "every_k_zero": (ValueError, r"`remat.segmenters.every` needs a positive int `k`, but got 0",
                     lambda: S.every(0)),
    "revolve_negative": (ValueError, r"`remat.segmenters.revolve`.*`slots`.*-1", lambda: S.revolve(-1)),
    "multilevel_bool": (ValueError, r"`remat.segmenters.multilevel`.*True", lambda: S.multilevel(True)),
    "budget_float": (ValueError, r"`remat.segmenters.budget`.*max_bytes.*1.5", lambda: S.budget(1.5)),
    "no_layers": (ValueError, r"every\(...\).plan.*at least one layer", lambda: S.every(2).plan(0)),
    "bad_costs": (ValueError, r"LayerCost.*'abc'", lambda: S.sqrt().plan(["abc"])),
    "budget_needs_costs": (ValueError, r"budget.*measured bytes.*measure_costs",
                           lambda: S.budget(100).plan(16)),
    "no_chain": (TypeError, r"`every\(k=2\).plan` needs the chain.*plan\(12\)", lambda: S.every(2).plan()),
    "chain_twice": (TypeError, r"got the chain twice", lambda: S.sqrt().plan(4, costs=4)),
    "segments_do_not_tile": (ValueError, r"tile", lambda: Segment(0, 4, (Segment(0, 2), Segment(3, 4)))),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_name_the_api_and_the_fix(case):
  error_cases.expect(ERROR_CASES, case)


def test_renamed_names_still_work_with_a_deprecation_warning():
  with pytest.warns(DeprecationWarning, match=r"plan\(chain=...\)"):
    old = S.revolve(2).plan(costs=6)
  assert old == S.revolve(2).plan(chain=6) == S.revolve(2).plan(6)
  with pytest.warns(DeprecationWarning, match=r"`Plan.segmenter` is now `Plan.made_by`"):
    assert old.segmenter == old.made_by == "revolve(slots=2)"
  with pytest.warns(DeprecationWarning, match=r"from_tree\(made_by=...\)"):
    p = Plan.from_tree(Segment(0, 2), segmenter="mine")
  assert p.made_by == "mine" and str(p).startswith("Plan(mine, 2 layers)")
  with pytest.raises(TypeError, match="unexpected keywords"):
    Plan.from_tree(Segment(0, 2), label="mine")


# -- budget: the dynamic program ------------------------------------------------------

def lc(a, k, w, f):
  return S.LayerCost(input_bytes=a, output_bytes=a, kept_bytes=k, transient_bytes=w, flops=f,
                     step_flops=3 * f)


def test_budget_recomputes_nothing_when_plain_fits_and_names_the_smallest_budget():
  c = [lc(1000, 1000, 500, 1e6)] * 8
  plain = Plan.from_tree(Segment(0, 8), c, made_by="plain")
  p = S.budget(plain.predicted_peak_bytes).plan(c)
  assert p.recomputed_evaluations == 0 and p.predicted_peak_bytes == plain.predicted_peak_bytes
  tight = S.budget(plain.predicted_peak_bytes // 2).plan(c)
  assert tight.predicted_peak_bytes <= plain.predicted_peak_bytes // 2 and tight.recomputed_evaluations > 0
  # The smallest: the backward of one taped layer (1000 kept + 500 transient
  # + 1000 of incoming cotangent) with nothing else held.
  with pytest.raises(ValueError, match=r"feasible budget for this chain is .*\(2,500 bytes\)"):
    S.budget(2499).plan(c)
  assert S.budget(2500).plan(c).predicted_peak_bytes <= 2500


def all_trees(i, j, free, dead):
  """Every tree of the DP's grammar over [i, j), as lists of children (brute force)."""
  out = []
  rests = all_trees(i + 1, j, False, dead) if j > i + 1 else [[]]
  for r in rests:
    out.append([Segment(i, i + 1)] + r)
  for k in range(i + 1, j + 1):
    if free and k == j:
      continue
    for inner in all_trees(i, k, True, True):
      seg = Segment(i, k, tuple(inner) if len(inner) > 1 else (), True)
      for r in (all_trees(k, j, False, dead) if k < j else [[]]):
        out.append([seg] + r)
  return out


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    layers=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 12), st.integers(0, 8),
                              st.integers(1, 9)), min_size=1, max_size=5),
    frac=st.floats(0.0, 1.0))
def test_budget_dp_matches_brute_force(layers, frac):
  c = tuple(lc(a * 100, k * 100, w * 100, f * 1e6) for a, k, w, f in layers)
  n = len(c)
  plans = [Plan.from_tree(Segment(0, n, tuple(t)), c, made_by="") for t in all_trees(0, n, True, False)]
  lo = min(p.predicted_peak_bytes for p in plans)
  hi = max(p.predicted_peak_bytes for p in plans)
  b = int(lo + frac * (hi - lo))
  best = min(p.predicted_flops for p in plans if p.predicted_peak_bytes <= b)
  got = S.budget(b).plan(c)
  assert got.predicted_peak_bytes <= b
  assert got.predicted_flops == pytest.approx(best, rel=1e-9)
  with pytest.raises(ValueError, match=rf"feasible budget for this chain is (.*\()?{lo:,} (B|bytes)"):
    S.budget(lo - 1).plan(c)
  # At the smallest budget itself a plan exists (the exact min-peak tree if quantisation is too coarse).
  assert S.budget(lo).plan(c).predicted_peak_bytes == lo


def all_trees_with(i, j, free, dead, tapes, boundaries):
  """``all_trees`` with each taped layer under each of its ``tapes`` and, at the ``boundaries``,
  checkpoints whose stored input is offloaded (the DP's whole grammar)."""
  out = []
  rests = all_trees_with(i + 1, j, False, dead, tapes, boundaries) if j > i + 1 else [[]]
  for policy in tapes[i]:
    for r in rests:
      out.append([Segment(i, i + 1, policy=policy)] + r)
  for k in range(i + 1, j + 1):
    if free and k == j:
      continue
    for inner in all_trees_with(i, k, True, True, tapes, boundaries):
      for off in (False, True) if (not free and k < j and i in boundaries) else (False,):
        seg = Segment(i, k, tuple(inner) if len(inner) > 1 or inner[0].policy else (), True, off)
        for r in (all_trees_with(k, j, False, dead, tapes, boundaries) if k < j else [[]]):
          out.append([seg] + r)
  return out


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    layers=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 12), st.integers(0, 8), st.integers(1, 9),
                              st.booleans()), min_size=1, max_size=4),
    frac=st.floats(0.0, 1.0), offload=st.booleans())
def test_budget_dp_matches_brute_force_with_policies_and_offload(layers, frac, offload):
  """Per-layer policies (keep less, recompute part of the forward) and offloaded checkpoints (on a
  backend that executes offload): the DP's cheapest tree within a budget is the brute force's."""
  import dataclasses

  from remat._src.fitting.budget import _BudgetDP

  def layer(a, k, w, f, has_policy):
    c = lc(a * 100, k * 100, w * 100, f * 1e6)
    if has_policy:  # keeps half, recomputes 30% more of its step
      c = dataclasses.replace(c, policies=(("dots", dataclasses.replace(
          c, kept_bytes=c.kept_bytes // 2, step_flops=c.step_flops * 1.3)),))
    return c

  c = tuple(layer(*spec) for spec in layers)
  n = len(c)
  policy = remat.offload.host(min_bytes=0) if offload else None
  boundaries = S.offload_candidates(c, policy, backend="gpu")
  dp = _BudgetDP(c, boundaries, policy, backend="gpu")
  tapes = [[None] + [name for name, _ in x.policies] for x in c]

  def price(plan):  # the DP's objective: flops, and the exposed transfer time of each offload
    offloaded = []

    def walk(s):
      if s.offload:
        offloaded.append((s.start, s.stop))
      for ch in s.children:
        walk(ch)
    walk(plan.root)
    return plan.predicted_flops + sum(dp.offload_cost(i, k) for i, k in offloaded)

  plans = [Plan.from_tree(Segment(0, n, tuple(t)), c, made_by="")
           for t in all_trees_with(0, n, True, False, tapes, set(boundaries))]
  lo = min(p.predicted_peak_bytes for p in plans)
  hi = max(p.predicted_peak_bytes for p in plans)
  assert dp.min_peak() == lo
  b = int(lo + frac * (hi - lo))
  best = min(price(p) for p in plans if p.predicted_peak_bytes <= b)
  got = Plan.from_tree(dp.solve(b), c, made_by="")
  assert got.predicted_peak_bytes <= b
  assert price(got) == pytest.approx(best, rel=1e-9)


def test_budget_on_a_long_uniform_chain_beats_uniform_segmentations():
  c = [lc(1 << 20, 1 << 20, 1 << 19, 1e9)] * 48
  for seg in (S.every(4), S.sqrt(), S.multilevel(2), S.revolve(4)):
    p = seg.plan(c)
    b = S.budget(p.predicted_peak_bytes).plan(c)
    assert b.predicted_peak_bytes <= p.predicted_peak_bytes
    assert b.predicted_flops <= p.predicted_flops, (seg, str(b))


def test_offload_hook_rejects_what_is_not_an_offload_policy():
  with pytest.raises(TypeError, match="remat.segmenters.budget"):
    S.offload_candidates((lc(1, 1, 1, 1),), "host")
  assert S.offload_candidates((lc(1, 1, 1, 1),), None) == ()
