"""remat.linen.Sequential and remat.nnx.Sequential: trees, gradients, schedules, per-shape budgets."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import remat
from remat import segmenters as S
from remat_bench.models.linen import TransformerBlock

SEGMENTERS = [None, S.every(2), S.sqrt(), S.revolve(2), S.none(), S.multilevel(2)]


def dense_layers(n=6, width=8):
  return [nn.Dense(width) for _ in range(n)]


@pytest.mark.parametrize("seg", SEGMENTERS, ids=repr)
def test_linen_tree_equals_nn_sequential_and_gradients_equal_plain(seg):
  x = jax.random.normal(jax.random.key(1), (4, 8))
  model = remat.linen.Sequential(dense_layers(), segmenter=seg)
  ref = nn.Sequential(dense_layers())
  v = model.init(jax.random.key(0), x)
  chex.assert_trees_all_equal(v, ref.init(jax.random.key(0), x))
  got = jax.grad(lambda v: jnp.tanh(model.apply(v, x)).sum())(v)
  want = jax.grad(lambda v: jnp.tanh(ref.apply(v, x)).sum())(v)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


class TanhDense(nn.Module):
  """A nonlinear layer: a linear one's forward output is dead code in a recomputation."""

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(128, use_bias=False)(x))


class NNXTanhLinear(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(128, 128, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


@functools.lru_cache(maxsize=None)
def dense_step_profile(seg):
  model = remat.linen.Sequential([TanhDense() for _ in range(12)], segmenter=seg)
  x = jax.ShapeDtypeStruct((256, 128), jnp.float32)
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  step = remat.jit(jax.value_and_grad(lambda v, x: jnp.sum(model.apply(v, x))))
  plan = model.apply(jax.tree_util.tree_map(jnp.zeros_like, v), jnp.zeros(x.shape), method="plan_for")
  return remat.profile(step, v, x), plan


@pytest.mark.parametrize("seg", [S.every(3), S.revolve(3), S.none()], ids=repr)
def test_linen_compiled_forward_matmuls_equal_the_plan(seg):
  prof, plan = dense_step_profile(seg)
  assert prof.forward_dots() == plan.forward_evaluations
  plain, _ = dense_step_profile(None)
  assert prof.temp_bytes < plain.temp_bytes


def blocks(n, dropout=0.1):
  return [TransformerBlock(32, 4, dropout_rate=dropout) for _ in range(n)]


@pytest.mark.parametrize("seg", [S.every(2), S.revolve(2)], ids=repr)
def test_linen_transformer_dropout_gradients_identical_for_every_segmenter(seg):
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  plain = remat.linen.Sequential(blocks(4))
  model = remat.linen.Sequential(blocks(4), segmenter=seg)
  v = plain.init(jax.random.key(0), x, False)
  rngs = {"dropout": jax.random.key(5)}
  loss = lambda m: jax.grad(lambda v: m.apply(v, x, True, rngs=rngs).sum())(v)  # noqa: E731
  got, want = loss(model), loss(plain)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  # The masks are real: another dropout key changes the gradients.
  other = jax.grad(lambda v: plain.apply(v, x, True, rngs={"dropout": jax.random.key(6)}).sum())(v)
  assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: bool(jnp.allclose(a, b, atol=1e-3)), want, other)))


# -- a transformer under a memory budget, at three sequence lengths -------------------------

DEPTH, WIDTH, BATCH = 6, 64, 2


@functools.lru_cache(maxsize=None)
def transformer_profiles():
  def make(seg):
    return remat.linen.Sequential([TransformerBlock(WIDTH, 4, dropout_rate=0.1) for _ in range(DEPTH)],
                                  segmenter=seg)

  v = make(None).init(jax.random.key(0), jnp.ones((BATCH, 64, WIDTH)), False)
  key = jax.random.key(1)

  def profile(seg, length):
    m = make(seg)
    step = remat.jit(jax.value_and_grad(lambda v, x, k: m.apply(v, x, True, rngs={"dropout": k}).sum()))
    x = jax.ShapeDtypeStruct((BATCH, length, WIDTH), jnp.float32)
    prof = remat.profile(step, v, x, key)
    plan = m.apply(v, jnp.zeros(x.shape), True, rngs={"dropout": key}, method="plan_for")
    return prof, plan

  lengths = (64, 256)
  plain = {n: profile(None, n)[0] for n in lengths}
  budget = (plain[64].temp_bytes + plain[256].temp_bytes) // 2
  planned = {n: profile(S.budget(budget), n) for n in lengths}
  return plain, planned, budget


def test_transformer_stays_under_budget_at_every_length_and_recomputes_only_when_needed():
  plain, planned, m = transformer_profiles()
  assert plain[256].temp_bytes > m
  for n, (prof, plan) in planned.items():
    assert prof.temp_bytes <= m, (n, str(plan))
    if plain[n].temp_bytes <= m:
      assert not plan.recomputes
      assert prof.count_dots() == plain[n].count_dots()
    else:  # whole blocks, or inside blocks under a policy (the planner chooses)
      assert plan.recomputes
      assert prof.flops > plain[n].flops
    # The plan's prediction is close to what the whole module compiles to.
    assert abs(plan.predicted_peak_bytes - prof.temp_bytes) <= 0.1 * prof.temp_bytes, (n, str(plan))


def test_linen_errors():
  with pytest.raises(ValueError, match=r"`remat.linen.Sequential` needs a non-empty list"):
    remat.linen.Sequential([])
  with pytest.raises(TypeError, match=r"`segmenter` of `remat.linen.Sequential`.*'sqrt'"):
    remat.linen.Sequential(dense_layers(), segmenter="sqrt")
  with pytest.raises(ValueError, match=r"plan is for 4 layers but the chain has 6"):
    remat.linen.Sequential(dense_layers(), segmenter=S.every(2).plan(4))

  class Stat(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(x)

  model = remat.linen.Sequential([Stat(), Stat()], segmenter=S.every(1))
  v = model.init(jax.random.key(0), jnp.ones((4, 3)))
  with pytest.raises(NotImplementedError, match=r"updates the collections \['batch_stats'\]"):
    model.apply(v, jnp.ones((4, 3)), mutable=["batch_stats"])


# -- NNX ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seg", [None, S.every(2), S.revolve(2), S.none(), S.budget(10**5)], ids=repr)
def test_nnx_state_equals_nnx_sequential_and_gradients_equal_plain(seg):
  x = jax.random.normal(jax.random.key(1), (4, 8))
  model = remat.nnx.Sequential(*[nnx.Linear(8, 8, rngs=nnx.Rngs(i)) for i in range(6)], segmenter=seg)
  ref = nnx.Sequential(*[nnx.Linear(8, 8, rngs=nnx.Rngs(i)) for i in range(6)])
  chex.assert_trees_all_equal(nnx.state(model), nnx.state(ref))
  loss = lambda m, x: jnp.tanh(m(x)).sum()  # noqa: E731
  chex.assert_trees_all_close(nnx.grad(loss)(model, x), nnx.grad(loss)(ref, x), atol=1e-5, rtol=1e-5)


def test_nnx_dropout_gradients_equal_plain_over_two_calls():
  from remat_bench.models.nnx import TransformerBlock as NNXBlock

  def make(seg):
    return remat.nnx.Sequential(
        *[NNXBlock(32, 4, dropout_rate=0.1, rngs=nnx.Rngs(params=i, dropout=7)) for i in range(4)],
        segmenter=seg)

  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  a, b = make(S.every(2)), make(None)
  for _ in range(2):  # the RNG count advances once per call in both
    ga = nnx.grad(lambda m: m(x).sum())(a)
    gb = nnx.grad(lambda m: m(x).sum())(b)
    chex.assert_trees_all_close(ga, gb, atol=1e-4, rtol=1e-4)


def test_nnx_forward_matmuls_equal_the_plan():
  model = remat.nnx.Sequential(*[NNXTanhLinear(nnx.Rngs(i)) for i in range(12)],
                               segmenter=S.revolve(3))
  gd, state = nnx.split(model)

  def step(state, x):
    return jax.value_and_grad(lambda s: nnx.merge(gd, s)(x).sum())(state)

  prof = remat.profile(step, state, jnp.ones((256, 128)))
  assert prof.forward_dots() == \
      model.plan_for(jnp.ones((256, 128))).forward_evaluations == S.revolve_evaluations(12, 3)


def test_nnx_errors():
  with pytest.raises(ValueError, match=r"`remat.nnx.Sequential` needs at least one layer"):
    remat.nnx.Sequential(segmenter=S.sqrt())
  with pytest.raises(TypeError, match=r"`segmenter` of `remat.nnx.Sequential`.*3"):
    remat.nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), segmenter=3)
  layers = [nnx.Linear(2, 2, rngs=nnx.Rngs(0)) for _ in range(3)]
  with pytest.raises(TypeError, match=r"separate arguments.*one list of 3.*Sequential\(\*layers"):
    remat.nnx.Sequential(layers, segmenter=S.sqrt())
  with pytest.raises(TypeError, match=r"layer 1 of `remat.nnx.Sequential` must be callable.*int: 5"):
    remat.nnx.Sequential(layers[0], 5)
