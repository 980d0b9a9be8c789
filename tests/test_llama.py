"""The Llama-style reference decoder: MaxText's checkpoint names, linen = NNX, policies against plain."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import remat
from remat_bench.models import llama
from remat_bench.models.llama import linen as L
from remat_bench.models.llama import nnx as N

WIDTH, HEADS, MLP, BATCH, SEQ = 32, 4, 64, 2, 8
QKV = ("query_proj", "key_proj", "value_proj")


def tags_in(jaxpr) -> list[str]:
  """Names of the ``checkpoint_name`` equations of a jaxpr, sub-jaxprs included, in order."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "name":
      out.append(eqn.params["name"])
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          out += tags_in(sub)
  return out


def named_residuals(fn, *args) -> dict[str, str]:
  """``{name: memory kind}`` of the tagged residuals ``fn``'s backward pass keeps on device, and
  ``{"host": shapes}`` of those it offloads (jax lists them as ``device_put`` outputs, unnamed)."""
  out, host = {}, []
  for r in remat.saved_residuals(fn, *args):
    m = re.search(r"named '(\w+)'", r.source)
    if r.memory_kind == "host":
      host.append(r.shape)
    elif m:
      out[m.group(1)] = r.memory_kind
  if host:
    out["host"] = sorted(host)
  return out


@functools.lru_cache(maxsize=None)
def linen_block(fused=False, rate=0.0, dtype=jnp.float32):
  blk = L.DecoderBlock(WIDTH, HEADS, MLP, rate, dtype, fused_mlp=fused)
  x = jax.random.normal(jax.random.key(0), (BATCH, SEQ, WIDTH))
  v = blk.init(jax.random.key(1), x)
  return blk, v, x


def linen_fn(blk):
  """``f(v, x, key)``: the block in training mode with dropout key ``key``."""
  return lambda v, x, key: blk.apply(v, x, True, rngs={"dropout": key})


### Names


@pytest.mark.parametrize("fused", [False, True], ids=["wi_0/wi_1", "fused_mlp"])
@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_block_carries_maxtext_checkpoint_names_once_each(framework, fused):
  if framework == "linen":
    blk, v, x = linen_block(fused)
    jaxpr = jax.make_jaxpr(lambda v, x: blk.apply(v, x))(v, x).jaxpr
  else:
    blk = N.DecoderBlock(WIDTH, HEADS, MLP, fused_mlp=fused, rngs=nnx.Rngs(0))
    x = jnp.ones((BATCH, SEQ, WIDTH))
    jaxpr = jax.make_jaxpr(lambda x: blk(x))(x).jaxpr
  expected = ["decoder_layer_input", *QKV, "context", "out_proj",
              *(["mlpwi"] if fused else ["mlpwi_0", "mlpwi_1"]), "mlpwo"]
  assert tags_in(jaxpr) == expected == list(llama.tag_names(fused))


def test_save_only_qkv_names_saves_exactly_query_key_value():
  blk, v, x = linen_block()
  policy = jax.checkpoint_policies.save_only_these_names(*QKV)
  f = jax.checkpoint(lambda v, x: blk.apply(v, x), policy=policy)
  res = remat.saved_residuals(f, v, x)
  named = [r for r in res if "from the argument" not in r.source]
  # Everything kept besides the arguments is q, k and v, each [batch, length, heads, head_dim].
  assert sorted(re.search(r"named '(\w+)'", r.source).group(1) for r in named) == sorted(QKV), res
  assert all(r.shape == (BATCH, SEQ, HEADS, WIDTH // HEADS) for r in named)
  # Recompute-everything keeps only the arguments.
  full = remat.saved_residuals(jax.checkpoint(lambda v, x: blk.apply(v, x)), v, x)
  assert all("from the argument" in r.source for r in full), full


### linen and NNX compute the same function


def _nnx_grads_as_linen(grads, depth):
  g = dict(nnx.to_pure_dict(grads))
  blocks = g.pop("blocks")
  return {**g, **{f"block_{i}": blocks[i] for i in range(depth)}}


@pytest.mark.parametrize("dtype, tie, fused", [(jnp.float32, True, False), (jnp.bfloat16, False, True)],
                         ids=["float32-tied", "bfloat16-untied-fused"])
def test_linen_and_nnx_same_outputs_and_gradients_with_the_same_parameters(dtype, tie, fused):
  kw = dict(vocab=48, depth=2, width=WIDTH, heads=HEADS, mlp_dim=MLP, dropout_rate=0.1, dtype=dtype,
            fused_mlp=fused, tie_embeddings=tie)
  tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, 48)
  lin = L.LlamaLM(**kw)
  params = jax.jit(lin.init)(jax.random.key(1), tokens)["params"]
  model = N.LlamaLM(**kw, rngs=nnx.Rngs(params=5, dropout=6))
  N.load_linen_params(model, params)
  model.eval()  # dropout off in both (linen: train=False)

  def loss_linen(p):
    return jnp.mean(lin.apply({"params": p}, tokens).astype(jnp.float32) ** 2)

  def loss_nnx(m):
    return jnp.mean(m(tokens).astype(jnp.float32) ** 2)

  out_l = jax.jit(lambda p: lin.apply({"params": p}, tokens))(params)
  out_n = nnx.jit(lambda m: m(tokens))(model)
  assert out_l.dtype == out_n.dtype == dtype
  chex.assert_trees_all_equal(out_n, out_l)
  g_l = jax.jit(jax.grad(loss_linen))(params)
  g_n = nnx.jit(nnx.grad(loss_nnx))(model)
  chex.assert_trees_all_equal(_nnx_grads_as_linen(g_n, 2), g_l)


def test_load_linen_params_rejects_another_configuration():
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = L.LlamaLM(depth=1, width=32, heads=4).init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match=r"`load_linen_params`.*same configuration"):
    N.load_linen_params(N.LlamaLM(depth=1, width=64, heads=4, rngs=nnx.Rngs(0)), params)


def test_bad_heads_error_names_the_fix():
  with pytest.raises(ValueError, match=r"divisible by `heads`.*width=30, heads=4"):
    N.DecoderBlock(30, 4, rngs=nnx.Rngs(0))


### Policies: what they save, and gradients against plain

# What the backward pass of one block consumes among the tagged values: `mlpwo` only feeds the
# residual sum that is the block's output, and `decoder_layer_input` is the argument itself.
CONSUMED = set(QKV) | {"context", "out_proj", "mlpwi_0", "mlpwi_1"}
SHAPES = {**{n: (BATCH, SEQ, HEADS, WIDTH // HEADS) for n in (*QKV, "context")},
          "out_proj": (BATCH, SEQ, WIDTH), "mlpwi_0": (BATCH, SEQ, MLP), "mlpwi_1": (BATCH, SEQ, MLP)}


@pytest.mark.parametrize("name", [n for n in llama.presets() if n != "none"])
def test_presets_keep_their_names_on_device_or_host(name):
  blk, v, x = linen_block()
  f = jax.checkpoint(lambda v, x: blk.apply(v, x), policy=llama.presets()[name])
  saved, offloaded = llama.preset_names(name)
  expected = {n: "device" for n in CONSUMED & set(saved)}
  if offloaded:
    expected["host"] = sorted(SHAPES[n] for n in CONSUMED & set(offloaded))
  assert named_residuals(f, v, x) == expected


def test_presets_are_maxtexts_in_order_and_stable():
  p = llama.presets()
  assert list(p) == ["none", "minimal_with_context", "minimal", "save_dot_with_context_except_mlp",
                     "save_dot_except_mlpwi", "save_dot_except_mlp", "save_qkv_proj",
                     "qkv_proj_offloaded", "minimal_offloaded", "save_out_proj", "full"]
  assert p["none"] is None and p["full"] is jax.checkpoint_policies.nothing_saveable
  assert all(llama.presets()[k] is v for k, v in p.items())  # same objects: hashable, comparable
  # MaxText's `minimal` saves everything but the context; `minimal_with_context` adds it.
  assert "context" not in llama.preset_names("minimal")[0]
  assert set(llama.preset_names("minimal_with_context")[0]) - set(llama.preset_names("minimal")[0]) == {
      "context"}
  assert llama.preset_names("save_dot_except_mlp")[0] == (
      "query_proj", "value_proj", "key_proj", "kv_proj", "qkv_proj", "out_proj")
  with pytest.raises(KeyError, match="unknown MaxText remat preset 'minimal_flash'"):
    llama.preset_names("minimal_flash")


@pytest.mark.parametrize("name", ["full", "save_qkv_proj", "minimal_with_context"])
def test_remat_checkpoint_with_preset_policy_gradients_equal_plain_with_dropout(name):
  blk, v, x = linen_block(rate=0.2)
  f = linen_fn(blk)
  key = jax.random.key(3)

  def loss(f):
    return lambda v, x: jnp.sum(f(v, x, key) ** 2)

  plain = jax.jit(jax.grad(loss(f), argnums=(0, 1)))(v, x)
  ck = remat.jit(jax.grad(loss(remat.checkpoint(f, policy=llama.presets()[name])), argnums=(0, 1)))(v, x)
  chex.assert_trees_all_close(ck, plain, atol=1e-6, rtol=1e-6)


def test_lm_with_per_block_policies_in_both_adapters_gradients_equal_plain():
  kw = dict(vocab=48, depth=2, width=WIDTH, heads=HEADS, mlp_dim=MLP, dropout_rate=0.2)
  tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, 48)
  policy = llama.presets()["save_qkv_proj"]
  key = jax.random.key(4)

  def linen_grads(wrapper):
    lm = L.LlamaLM(**kw, block_wrapper=wrapper)
    params = L.LlamaLM(**kw).init(jax.random.key(1), tokens)["params"]
    return remat.jit(jax.grad(lambda p: jnp.mean(
        lm.apply({"params": p}, tokens, True, rngs={"dropout": key}) ** 2)))(params)

  chex.assert_trees_all_close(
      linen_grads(functools.partial(remat.linen.checkpoint, static_argnums=(2,), policy=policy)),
      linen_grads(None), atol=1e-6, rtol=1e-6)

  def nnx_grads(wrapper):
    model = N.LlamaLM(**kw, block_wrapper=wrapper, rngs=nnx.Rngs(params=1, dropout=2))
    return nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2)))(model)

  chex.assert_trees_all_close(nnx_grads(functools.partial(remat.nnx.checkpoint, policy=policy)),
                              nnx_grads(None), atol=1e-6, rtol=1e-6)
