"""remat.linen.checkpoint against the plain module and flax.linen.remat."""

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import remat
from remat_bench.models import data
from remat_bench.models import linen as models
from exactness import assert_same_gradients
from lowering import cuda_placements

ours = functools.partial(remat.linen.checkpoint, static_argnums=(2,))
flax_remat = functools.partial(nn.remat, static_argnums=(2,))
WRAPPERS = {"plain": None, "ours": ours, "flax": flax_remat}


def xent(logits, targets):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()


@functools.lru_cache(maxsize=None)
def lm_setup():
  x, y = next(data.lm_batches(4, 16, seed=3))
  model = models.TransformerLM(vocab=data.VOCAB_SIZE, seq_len=16, depth=2, width=32, heads=4,
                               dropout_rate=0.2)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  return jnp.asarray(x), jnp.asarray(y), params


@functools.lru_cache(maxsize=None)
def lm_grad_fn(kind, jit=jax.jit):
  model = models.TransformerLM(vocab=data.VOCAB_SIZE, seq_len=16, depth=2, width=32, heads=4,
                               dropout_rate=0.2, block_wrapper=WRAPPERS[kind])

  def loss(params, x, y, key):
    return xent(model.apply({"params": params}, x, True, rngs={"dropout": key}), y)

  return jit(jax.value_and_grad(loss))


def test_parameter_tree_identical_auto_names_and_explicit_names():
  x = jnp.ones((2, 8))

  class Net(nn.Module):
    block: type

    @nn.compact
    def __call__(self, x):
      x = self.block(8)(x)  # auto-named: Block name must be kept
      return self.block(8, name="explicit")(x)

  plain = Net(models.MLPBlock).init(jax.random.key(0), x)
  ck = Net(remat.linen.checkpoint(models.MLPBlock)).init(jax.random.key(0), x)
  chex.assert_trees_all_equal(plain, ck)
  assert set(plain["params"]) == {"MLPBlock_0", "explicit"}


def test_model_parameter_tree_identical_and_weights_load_unchanged():
  x, y, params = lm_setup()
  model = models.TransformerLM(vocab=data.VOCAB_SIZE, seq_len=16, depth=2, width=32, heads=4,
                               dropout_rate=0.2, block_wrapper=ours)
  chex.assert_trees_all_equal(jax.jit(model.init)(jax.random.key(0), x)["params"], params)
  # Weights from the plain model give the same outputs in the checkpointed one.
  plain = models.TransformerLM(vocab=data.VOCAB_SIZE, seq_len=16, depth=2, width=32, heads=4,
                               dropout_rate=0.2)
  chex.assert_trees_all_close(jax.jit(model.apply)({"params": params}, x),
                              jax.jit(plain.apply)({"params": params}, x), atol=1e-6)


@pytest.mark.parametrize("kind", ["ours", "flax"])
def test_dropout_gradients_equal_plain(kind):
  x, y, params = lm_setup()
  key = jax.random.key(7)
  loss0, g0 = lm_grad_fn("plain")(params, x, y, key)
  loss1, g1 = lm_grad_fn(kind)(params, x, y, key)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  chex.assert_trees_all_close(g1, g0, atol=1e-5, rtol=1e-5)
  # Dropout is really on: another key gives another loss.
  loss2, _ = lm_grad_fn("ours")(params, x, y, jax.random.key(8))
  assert abs(float(loss2) - float(loss0)) > 1e-4


@pytest.mark.parametrize("jit", [jax.jit, remat.jit], ids=["jax.jit", "remat.jit"])
def test_dropout_gradients_bit_identical_to_plain_with_keys_tied(jit):
  # Each block's keys pass through an optimization_barrier with its input (docs/facts.md,
  # fact 11); the barrier is the identity, kept by remat.jit and removed by jax.jit on CPU.
  x, y, params = lm_setup()
  key = jax.random.key(7)
  assert_same_gradients(lm_grad_fn("ours", jit)(params, x, y, key),
                        lm_grad_fn("plain", jit)(params, x, y, key))
  # and bit-identical to flax.linen.remat's, on every jax version
  chex.assert_trees_all_equal(lm_grad_fn("ours", jit)(params, x, y, key),
                              lm_grad_fn("flax", jit)(params, x, y, key))


def test_dropout_gradients_with_train_flag_as_keyword_and_no_static_argnums():
  # No static_argnums: a Python bool is static automatically, also as a keyword.
  x, y, params = lm_setup()

  class Wrapper(nn.Module):
    @nn.compact
    def __call__(self, x):
      block = remat.linen.checkpoint(models.TransformerBlock)
      return block(32, 4, 4, 0.5, name="b")(x, train=True)

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return models.TransformerBlock(32, 4, 4, 0.5, name="b")(x, train=True)

  h = jax.random.normal(jax.random.key(1), (2, 8, 32))
  p = jax.jit(Plain().init)({"params": jax.random.key(0), "dropout": jax.random.key(1)}, h)["params"]

  def grads(m):
    return jax.jit(jax.grad(
        lambda p, h: m.apply({"params": p}, h, rngs={"dropout": jax.random.key(3)}).sum(),
        argnums=(0, 1)))(p, h)

  chex.assert_trees_all_close(grads(Wrapper()), grads(Plain()), atol=1e-5, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def cnn_step(kind):
  model = models.CNN(depth=2, channels=8, block_wrapper=WRAPPERS[kind])

  def step(variables, x, y):
    def loss(params):
      logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    x, True, mutable=["batch_stats"])
      return xent(logits, y), updates

    (l, updates), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return l, g, updates["batch_stats"]

  return model, remat.jit(step)


def test_batchnorm_statistics_identical_after_a_step():
  x, y = data.image_batch(jax.random.key(0), 4, size=8)
  model, _ = cnn_step("plain")
  variables = model.init(jax.random.key(1), x)
  ref = cnn_step("plain")[1](variables, x, y)
  for kind in ("ours", "flax"):
    out = cnn_step(kind)[1](variables, x, y)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    chex.assert_trees_all_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(out[2], ref[2])  # batch_stats: bit for bit
  # The statistics moved (updated once, by momentum 0.9, from the initial zeros/ones).
  assert not np.allclose(ref[2]["block_0"]["bn"]["mean"], 0.0)


def test_batchnorm_updated_once_in_eval_of_many_calls():
  # Each call of a checkpointed block writes its statistics once: after one step the
  # running mean is exactly 0.1 * batch mean (momentum 0.9, from zeros).
  x, _ = data.image_batch(jax.random.key(2), 4, size=8)

  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return remat.linen.checkpoint(models.ConvBlock)(3, name="c")(x, True)

  v = One().init(jax.random.key(0), x)
  _, upd = One().apply(v, x, mutable=["batch_stats"])
  conv = nn.Conv(3, (3, 3), use_bias=False).apply({"params": v["params"]["c"]["conv"]}, x)
  np.testing.assert_allclose(upd["batch_stats"]["c"]["bn"]["mean"], 0.1 * conv.mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-7)


def test_method_decorator_matches_plain_with_dropout():
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(8)(x)
      return nn.Dropout(0.5, deterministic=not train)(jnp.tanh(x))

  class Decorated(nn.Module):
    @functools.partial(remat.linen.checkpoint, static_argnums=(2,))
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(8)(x)
      return nn.Dropout(0.5, deterministic=not train)(jnp.tanh(x))

  x = jax.random.normal(jax.random.key(0), (4, 8))
  v = jax.jit(Plain().init, static_argnums=2)(jax.random.key(1), x, False)
  chex.assert_trees_all_equal(jax.jit(Decorated().init, static_argnums=2)(jax.random.key(1), x, False), v)

  def grad(m):
    loss = lambda p: m.apply({"params": p}, x, True, rngs={"dropout": jax.random.key(2)}).sum()
    return remat.jit(jax.grad(loss))(v["params"])

  chex.assert_trees_all_close(grad(Decorated()), grad(Plain()), atol=1e-6)
  assert remat.profile(jax.value_and_grad(
      lambda p: Decorated().apply({"params": p}, x, True, rngs={"dropout": jax.random.key(2)}).sum()),
      v["params"]).forward_dots() == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_dtypes_gradients_equal_plain(dtype):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(8, dtype=dtype, param_dtype=dtype)(x)
      return nn.Dropout(0.3, deterministic=False)(jnp.tanh(h))

  x = jax.random.normal(jax.random.key(0), (4, 8)).astype(dtype)
  v = jax.jit(Block().init)(jax.random.key(1), x)

  def grad(cls):
    loss = lambda p, x: cls().apply({"params": p}, x, rngs={"dropout": jax.random.key(2)}).astype(
        jnp.float32).sum()
    return remat.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)

  ours_g, plain_g = grad(remat.linen.checkpoint(Block)), grad(Block)
  assert jax.tree_util.tree_leaves(ours_g)[0].dtype == dtype
  chex.assert_trees_all_close(ours_g, plain_g, atol=1e-5 if dtype == jnp.float32 else 1e-2)


def test_sown_intermediates_collected_once():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Dense(4)(x))
      self.sow("intermediates", "h", h)
      return h

  x = jnp.ones((2, 4))

  def run(cls):
    v = cls(name="b").init(jax.random.key(0), x)
    (y, state), g = jax.value_and_grad(
        lambda p: (lambda out: (out[0].sum(), out[1]))(cls(name="b").apply(
            {"params": p}, x, mutable=["intermediates"])), has_aux=True)(v["params"])
    return y, state, g

  y0, s0, g0 = run(Block)
  y1, s1, g1 = run(remat.linen.checkpoint(Block))
  chex.assert_trees_all_close((y1, s1, g1), (y0, s0, g0), atol=1e-6)
  assert len(s1["intermediates"]["h"]) == 1


class ScanBody(nn.Module):
  width: int
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, _):
    h = jnp.tanh(nn.Dense(self.width, name="dense")(x))
    return x + nn.Dropout(self.rate, deterministic=self.rate == 0.0)(h), None


def scanned(block_cls, depth, width, rate):
  return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 length=depth)(width, rate, name="layers")


class ScanNet(nn.Module):
  wrap: bool
  rate: float = 0.0

  @nn.compact
  def __call__(self, x):
    cls = remat.linen.checkpoint(ScanBody, prevent_cse=False) if self.wrap else ScanBody
    x, _ = scanned(cls, 3, x.shape[-1], self.rate)(x, None)
    return x


def test_nn_scan_over_checkpointed_block_matches_unscanned_plain_model():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  params = ScanNet(True).init(jax.random.key(1), x)["params"]
  assert params["layers"]["dense"]["kernel"].shape == (3, 8, 8)

  def unscanned(params, x):
    for i in range(3):
      layer = jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"])
      x, _ = ScanBody(8).apply({"params": layer}, x, None)
    return x

  loss_s = lambda p, x: jnp.sum(ScanNet(True).apply({"params": p}, x) ** 2)
  loss_u = lambda p, x: jnp.sum(unscanned(p, x) ** 2)
  chex.assert_trees_all_close(remat.jit(jax.grad(loss_s, argnums=(0, 1)))(params, x),
                              jax.grad(loss_u, argnums=(0, 1))(params, x), atol=1e-5, rtol=1e-5)


def test_nn_scan_with_dropout_matches_plain_scan():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  params = ScanNet(False, 0.3).init(jax.random.key(1), x)["params"]

  def grad(wrap):
    def loss(p):
      return jnp.sum(ScanNet(wrap, 0.3).apply({"params": p}, x, rngs={"dropout": jax.random.key(5)}) ** 2)
    return remat.jit(jax.grad(loss))(params)

  chex.assert_trees_all_close(grad(True), grad(False), atol=1e-5, rtol=1e-5)


def test_nn_jit_and_methods_option():
  class Enc(nn.Module):
    def setup(self):
      self.d = nn.Dense(4)

    def __call__(self, x):
      return self.encode(x)

    def encode(self, x):
      return jnp.tanh(self.d(x))

  x = jnp.ones((2, 4))
  Ck = remat.linen.checkpoint(Enc, methods=["encode", "__call__"])
  Jit = nn.jit(Ck)
  v = Enc().init(jax.random.key(0), x)
  chex.assert_trees_all_equal(Ck().init(jax.random.key(0), x), v)
  g0 = jax.grad(lambda v: Enc().apply(v, x, method="encode").sum())(v)
  g1 = jax.grad(lambda v: Jit().apply(v, x, method="encode").sum())(v)
  chex.assert_trees_all_close(g1, g0, atol=1e-6)


@functools.lru_cache(maxsize=None)
def lm_profile(kind, depth=6):
  model = models.TransformerLM(vocab=data.VOCAB_SIZE, seq_len=32, depth=depth, width=32, heads=4,
                               dropout_rate=0.1, block_wrapper=WRAPPERS[kind])
  x = jnp.zeros((16, 32), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])

  def step(params, x, key):
    l, g = jax.value_and_grad(
        lambda p: xent(model.apply({"params": p}, x, True, rngs={"dropout": key}), x))(params)
    return l, jax.tree_util.tree_map(lambda a, b: a - 1e-3 * b, params, g)

  return remat.profile(remat.jit(step, donate_argnums=0), params, x, jax.random.key(0))


def test_compiled_memory_below_flax_remat_and_forward_count_matches():
  plain, flx, mine = (lm_profile(k) for k in ("plain", "flax", "ours"))
  assert mine.temp_bytes < 0.6 * plain.temp_bytes, (mine, plain)
  # With dropout, nn.remat lets XLA:CPU generate every block's dropout bits at the start of the
  # step; our keys are tied to each block's input (docs/facts.md, fact 11). Measured 0.64.
  assert mine.temp_bytes < 0.8 * flx.temp_bytes, (mine, flx)
  # Dense layers compile to dots contracting (1,)/(0,): 4 per block and the head. With
  # per-block checkpointing the backward recomputes each block; the last dense of each block
  # (fc2) is not needed by the backward and is pruned, so 3 more per block, as with flax.
  fwd = lambda p: p.forward_dots()
  assert fwd(plain) == 4 * 6 + 1
  assert fwd(mine) == fwd(flx) == fwd(plain) + 3 * 6
  assert mine.flops == pytest.approx(flx.flops, rel=0.01)


def test_mlp_forward_evaluations_doubled():
  # value_and_grad of a 4-block MLP: 4 forward dots plain, 8 with per-block checkpointing.
  x = jnp.ones((32, 16))
  counts = {}
  for kind in ("plain", "ours", "flax"):
    m = models.MLP(4, 16, block_wrapper=None if kind == "plain" else WRAPPERS[kind])
    p = m.init(jax.random.key(0), x)["params"]
    step = jax.value_and_grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, x) ** 2))
    counts[kind] = remat.profile(step, p).forward_dots()
  assert counts == {"plain": 4, "ours": 8, "flax": 8}


def test_policy_and_offload_are_passed_through():
  x = jnp.ones((32, 16))
  m = models.MLP(4, 16, block_wrapper=functools.partial(
      remat.linen.checkpoint, policy=jax.checkpoint_policies.dots_saveable))
  p = m.init(jax.random.key(0), x)["params"]
  step = jax.value_and_grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2))
  # dots are saved, so none is recomputed: as many forward dots as without checkpointing.
  assert remat.profile(step, p).forward_dots() == 4

  host = remat.offload.host(argnums=1, min_bytes=0)  # x of __call__(self, x), counting self
  m = models.MLP(2, 16, block_wrapper=functools.partial(remat.linen.checkpoint, offload=host))
  loss = lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    g = jax.jit(jax.grad(loss))(p)
  placed = cuda_placements(jax.grad(loss), p)
  # The block inputs (activations, 32x16) go to host; the variables (16x16, 16) never do.
  assert placed.count(("pinned_host", "tensor<32x16xf32>")) == 2, placed
  assert all(t == "tensor<32x16xf32>" for _, t in placed), placed
  plain = models.MLP(2, 16)
  chex.assert_trees_all_close(
      g, jax.grad(lambda p: jnp.sum(plain.apply({"params": p}, x) ** 2))(p), atol=1e-5)
  with pytest.raises(ValueError, match=r"`offload`.*counts `self` as 0"):
    remat.linen.checkpoint(models.MLPBlock, offload=remat.offload.host(argnums=0))


### Errors


def test_error_not_a_module_class():
  with pytest.raises(TypeError, match=r"`remat.linen.checkpoint` expects a `flax.linen.Module`"):
    remat.linen.checkpoint(3)
  with pytest.raises(TypeError, match=r"neither a Module class nor a method.*methods="):
    remat.linen.checkpoint(lambda x: x)
  with pytest.raises(ValueError, match=r"`methods`.*applies to Module classes"):
    remat.linen.checkpoint(models.MLPBlock.__call__, methods=["__call__"])
  with pytest.raises(TypeError, match=r"instance of `Dense`.*wrap the class"):
    remat.linen.checkpoint(nn.Dense(3))
  with pytest.raises(TypeError, match=r"class `int`, which is not a subclass"):
    remat.linen.checkpoint(int)


def test_error_static_argnums():
  with pytest.raises(ValueError, match=r"counts `self` as 0"):
    remat.linen.checkpoint(models.MLPBlock, static_argnums=(0,))
  with pytest.raises(TypeError, match=r"`static_argnums`.*must be an int or a tuple of ints"):
    remat.linen.checkpoint(models.MLPBlock, static_argnums="train")
  with pytest.raises(ValueError, match=r"out of range for `__call__`"):
    remat.linen.checkpoint(models.MLPBlock, static_argnums=(5,))
  Ck = remat.linen.checkpoint(models.MLPBlock, static_argnums=(1,))
  with pytest.raises(TypeError, match=r"position 1 of `__call__`.*is an array float32\[2, 4\].*drop"):
    Ck(4).init(jax.random.key(0), jnp.ones((2, 4)))


def test_error_unknown_methods():
  with pytest.raises(ValueError, match=r"`methods`.*names \['encode'\].*`MLPBlock` does not define"):
    remat.linen.checkpoint(models.MLPBlock, methods=["encode"])
  with pytest.raises(TypeError, match=r"`methods`.*list/tuple of method names"):
    remat.linen.checkpoint(models.MLPBlock, methods="__call__")


def test_error_bad_policy_names_our_api():
  with pytest.raises(TypeError, match=r"the `policy` argument to `remat.linen.checkpoint`"):
    remat.linen.checkpoint(models.MLPBlock, policy="dots")
