"""Reference models and data: shapes, parity between linen and NNX, corpus, a short training run."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import remat
from remat_bench.models import data
from remat_bench.models import linen as ml
from remat_bench.models import nnx as mn

ours_linen = functools.partial(remat.linen.checkpoint, static_argnums=(2,))


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", ["MLP", "TransformerLM", "CNN"])
def test_linen_and_nnx_models_have_the_same_parameters_and_output_shapes(name):
  if name == "MLP":
    x = jnp.ones((2, 16))
    lin, nx = ml.MLP(3, 16, 5), mn.MLP(3, 16, 5, rngs=nnx.Rngs(0))
    shape = (2, 5)
  elif name == "TransformerLM":
    x = jnp.zeros((2, 8), jnp.int32)
    lin = ml.TransformerLM(vocab=50, seq_len=8, depth=2, width=16, heads=2)
    nx = mn.TransformerLM(vocab=50, seq_len=8, depth=2, width=16, heads=2, rngs=nnx.Rngs(0))
    shape = (2, 8, 50)
  else:
    x = jnp.ones((2, 8, 8, 3))
    lin, nx = ml.CNN(2, 4, 7), mn.CNN(3, 2, 4, 7, rngs=nnx.Rngs(0))
    shape = (2, 7)
  variables = jax.jit(lin.init)(jax.random.key(0), x)
  assert n_params(variables["params"]) == n_params(nnx.state(nx, nnx.Param))
  assert jax.jit(lin.apply)(variables, x).shape == shape
  nx.eval()
  assert nnx.jit(lambda m, x: m(x))(nx, x).shape == shape


def test_block_wrapper_keeps_parameter_trees():
  x = jnp.zeros((2, 8), jnp.int32)
  kw = dict(vocab=50, seq_len=8, depth=2, width=16, heads=2)
  plain = jax.eval_shape(ml.TransformerLM(**kw).init, jax.random.key(0), x)
  ck = jax.eval_shape(ml.TransformerLM(**kw, block_wrapper=ours_linen).init, jax.random.key(0), x)
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(ck)
  a = nnx.state(mn.TransformerLM(**kw, rngs=nnx.Rngs(0)))
  b = nnx.state(mn.TransformerLM(**kw, block_wrapper=remat.nnx.checkpoint, rngs=nnx.Rngs(0)))
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.shape, a), jax.tree_util.tree_map(np.shape, b))


def test_transformer_is_causal():
  x = jax.random.randint(jax.random.key(0), (1, 8), 0, 50)
  y = x.at[0, 5].set((x[0, 5] + 1) % 50)
  lin = ml.TransformerLM(vocab=50, seq_len=8, depth=2, width=16, heads=2)
  v = jax.jit(lin.init)(jax.random.key(0), x)
  a, b = jax.jit(lin.apply)(v, x), jax.jit(lin.apply)(v, y)
  np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-6)
  assert not np.allclose(a[0, 5:], b[0, 5:])
  nx = mn.TransformerLM(vocab=50, seq_len=8, depth=2, width=16, heads=2, rngs=nnx.Rngs(0))
  nx.eval()
  f = nnx.jit(lambda m, t: m(t))
  a, b = f(nx, x), f(nx, y)
  np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-6)
  assert not np.allclose(a[0, 5:], b[0, 5:])


def test_transformer_width_must_divide_heads():
  with pytest.raises(ValueError, match="divisible"):
    mn.TransformerLM(width=10, heads=3, rngs=nnx.Rngs(0))


def test_corpus_and_tokenizer():
  text = data.load_corpus()
  assert 100_000 < len(text) < 400_000
  assert set(text) <= set(data.VOCAB) and data.VOCAB_SIZE == 96
  ids = data.encode(text[:1000])
  assert ids.dtype == np.int32 and data.decode(ids) == text[:1000]
  with pytest.raises(ValueError, match="not in the vocabulary"):
    data.encode("caf\u00e9")


def test_lm_batches_are_shifted_deterministic_and_split():
  a = data.lm_batches(3, 10, seed=1)
  b = data.lm_batches(3, 10, seed=1)
  (x1, y1), (x2, y2) = next(a), next(b)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
  assert x1.shape == y1.shape == (3, 10)
  xv, _ = next(data.lm_batches(3, 10, seed=1, split="valid"))
  assert not np.array_equal(xv, x1)
  with pytest.raises(ValueError, match="'train' or 'valid'"):
    next(data.lm_batches(3, 10, split="test"))


def test_short_training_run_losses_agree_with_and_without_checkpointing():
  # A few optax steps of the LM with dropout: per-block checkpointing gives the same losses.
  kw = dict(vocab=data.VOCAB_SIZE, seq_len=16, depth=2, width=32, heads=4, dropout_rate=0.1)
  batches = data.lm_batches(4, 16, seed=0)
  xs = [next(batches) for _ in range(4)]
  opt = optax.adam(3e-3)

  def run(wrapper):
    model = ml.TransformerLM(**kw, block_wrapper=wrapper)
    params = jax.jit(model.init)(jax.random.key(0), xs[0][0])["params"]
    state = opt.init(params)

    @remat.jit
    def step(params, state, x, y, key):
      def loss(p):
        logits = model.apply({"params": p}, x, True, rngs={"dropout": key})
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()

      l, g = jax.value_and_grad(loss)(params)
      upd, state = opt.update(g, state, params)
      return optax.apply_updates(params, upd), state, l

    losses = []
    for i, (x, y) in enumerate(xs):
      params, state, l = step(params, state, x, y, jax.random.key(i))
      losses.append(float(l))
    return np.array(losses)

  plain, ck = run(None), run(ours_linen)
  np.testing.assert_allclose(ck, plain, rtol=1e-5)
  assert plain[-1] < plain[0]
