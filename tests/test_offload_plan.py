"""The budget planner with host offload: keep, offload or recompute per stored input."""

import warnings

import chex
import jax
import jax.numpy as jnp
import pytest

import remat
from remat import segmenters as S
from remat.segmenters import LayerCost, Plan, Segment
from lowering import cuda_placements

MIB = 1 << 20
# 16 identical layers: 1 MiB activations, a layer keeps its input (1 MiB) when taped.
UNIFORM = [LayerCost(MIB, MIB, MIB, MIB // 4, 2e10, 6e10)] * 16


def _offloaded(seg):
  return [seg] * seg.offload + [s for c in seg.children for s in _offloaded(c)]


def test_cpu_plans_recomputation_only():
  host = remat.offload.host()
  assert S.offload_candidates(UNIFORM, host, backend="cpu") == ()
  assert S.offload_candidates(UNIFORM, None, backend="gpu") == ()
  p = S.budget(6 * MIB, offload=host).plan(UNIFORM, backend="cpu")
  assert p.offloaded_bytes == 0 and not _offloaded(p.root)
  assert p.root == S.budget(6 * MIB).plan(UNIFORM, backend="cpu").root


@pytest.mark.parametrize("budget_mib,moves", [(4, True), (6, True), (8, True), (12, False)])
def test_offload_replaces_recomputation_where_transfers_hide(budget_mib, moves):
  host = remat.offload.host()
  device_only = S.budget(budget_mib * MIB).plan(UNIFORM, backend="gpu")
  with_offload = S.budget(budget_mib * MIB, offload=host).plan(UNIFORM, backend="gpu")
  assert with_offload.predicted_peak_bytes <= budget_mib * MIB
  segs = _offloaded(with_offload.root)
  assert with_offload.offloaded_bytes == sum(UNIFORM[s.start].input_bytes for s in segs)
  assert bool(segs) is moves and ("offloaded to host" in str(with_offload)) is moves
  if moves:  # what it moves, it moves to save recomputation
    assert with_offload.forward_evaluations < device_only.forward_evaluations
  else:  # at 12 MiB, 21 evaluations need no transfer
    assert with_offload.root == device_only.root


def test_offload_is_used_when_it_pays_and_not_otherwise():
  host = remat.offload.host()
  tight = S.budget(5 * MIB, offload=host).plan(UNIFORM, backend="gpu")
  assert tight.offloaded_bytes > 0
  roomy = S.budget(64 * MIB, offload=host).plan(UNIFORM, backend="gpu")
  assert roomy.offloaded_bytes == 0 and roomy.recomputed_evaluations == 0  # keep beats offload
  slow = S.budget(5 * MIB, offload=remat.offload.host(bandwidth=1e3)).plan(UNIFORM, backend="gpu")
  assert slow.offloaded_bytes == 0  # a transfer that cannot hide costs more than recomputing
  small = S.budget(5 * MIB, offload=remat.offload.host(min_bytes=2 * MIB)).plan(UNIFORM, backend="gpu")
  assert small.offloaded_bytes == 0  # below min_bytes nothing moves


def test_simulator_counts_an_offloaded_input_only_while_it_is_on_device():
  kids = lambda off: (Segment(0, 4, (), True), Segment(4, 8, (), True, off), Segment(8, 16))
  a = Plan.from_tree(Segment(0, 16, kids(False)), UNIFORM, made_by="test")
  b = Plan.from_tree(Segment(0, 16, kids(True)), UNIFORM, made_by="test")
  assert a.forward_evaluations == b.forward_evaluations
  assert b.offloaded_bytes == MIB and a.offloaded_bytes == 0
  assert b.predicted_peak_bytes == a.predicted_peak_bytes - MIB
  with pytest.raises(ValueError, match="checkpoint=True"):
    Segment(0, 2, (), False, True)
  with pytest.raises(TypeError, match=r"`remat.segmenters.budget`.*remat.offload.host\(\)"):
    S.budget(MIB, offload="pinned_host")


def _layer(w, x):
  return jnp.tanh(x @ w)


def test_an_offload_plan_runs_exactly_and_moves_the_stored_boundaries():
  depth, act_shape = 8, (64, 32)
  ws = [jax.random.normal(jax.random.key(i), (32, 32)) / 6 for i in range(depth)]
  x = jax.random.normal(jax.random.key(99), act_shape)
  root = Segment(0, depth, (Segment(0, 3, (), True), Segment(3, 6, (), True, True), Segment(6, 8)))
  plan = Plan.from_tree(root, None, made_by="hand-made")
  apply = remat.sequential([_layer] * depth, plan)

  def loss(ws, x, f):
    return jnp.mean(f(ws, x) ** 2)

  def plain(ws, x):
    for w in ws:
      x = _layer(w, x)
    return x

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    got = jax.grad(loss, argnums=(0, 1))(ws, x, apply)
  want = jax.grad(loss, argnums=(0, 1))(ws, x, plain)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  placed = cuda_placements(jax.grad(lambda ws, x: loss(ws, x, apply)), ws, x)
  # Exactly one stored boundary (the input of [3, 6)) goes to host and comes back; no parameter moves.
  assert sorted(placed) == [("device", "tensor<64x32xf32>"), ("pinned_host", "tensor<64x32xf32>")]
  assert plan.offloaded_bytes == 0  # no costs given: bytes unknown
  assert apply.plan_for(ws, x, compile=True).offloaded_bytes == 64 * 32 * 4


def test_stacked_parameters_keep_an_offload_nested_in_a_later_segment():
  ck = lambda a, b, kids=(), off=False: Segment(a, b, kids, True, off)
  root = Segment(0, 4, (ck(0, 2, (ck(0, 1), ck(1, 2))), ck(2, 4, (ck(2, 3), ck(3, 4, (), True)))))
  plan = Plan.from_tree(root, None, made_by="hand-made")
  apply = remat.sequential(_layer, plan)  # one layer over stacked parameters
  ws = jnp.stack([jnp.eye(32) * 0.5] * 4)
  x = jnp.ones((64, 32))
  assert not apply.scanned(ws, x)  # a scan would drop the nested offload flag
  placed = cuda_placements(jax.grad(lambda ws: apply(ws, x).sum()), ws)
  assert [kind for kind, _ in placed].count("pinned_host") == 1


def test_a_transfer_behind_a_layer_without_compute_is_not_free():
  free_layer = LayerCost(MIB, MIB, MIB, 0, 0.0, 0.0)  # a reshape, say: no flops to hide behind
  costs = [UNIFORM[0]] + [free_layer] * 6 + [UNIFORM[0]]
  slow = remat.offload.host(bandwidth=1e3)
  p = S.budget(3 * MIB, offload=slow).plan(costs, backend="gpu")
  assert p.offloaded_bytes == 0


def test_tiny_budgets_plan_or_name_the_smallest_without_crashing():
  costs = [LayerCost(4096, 4096, 0, 0, 1e3, 3e3)]  # budget below the cost quantum: no zero division
  with pytest.raises(ValueError, match=r"feasible budget for this chain is .*\(4,096 bytes\)") as err:
    S.budget(100).plan(costs)
  assert "at least 4096" in str(err.value)
  p = S.budget(4096).plan(costs)
  assert p.predicted_peak_bytes <= 4096
