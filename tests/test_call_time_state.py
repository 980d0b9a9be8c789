"""Blocks that take state at call time, as flax's own examples pass it.

NNX models such as flax's Gemma example pass an `nnx.Rngs` to the model when they call it, and
every block draws its dropout masks from it. Through `remat.nnx.Sequential` and `remat.nnx.Scan`
the gradients must equal the plain model's and per-block `nnx.remat`'s, and the RNG counters must
advance as in the plain model. Linen blocks get their RNGs from the scope; what they take at call
time is arrays (masks), flags and `None`, positionally or by keyword.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import remat
from remat import segmenters as S
# Under nnx.jit (no compiler options) XLA:CPU may fuse a recomputed block differently from the taped
# one: equal to rounding (docs/facts.md, fact 23); other dropout masks would differ by the gradient.
from tests.exactness import assert_close_to_scale as assert_same_gradients

WIDTH, DEPTH = 8, 3
X = jnp.linspace(-1.0, 1.0, 4 * WIDTH).reshape(4, WIDTH)


class DecoderBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
    self.dropout = nnx.Dropout(0.5)

  def __call__(self, x, rngs: nnx.Rngs, *, scale=1.0):
    h = self.dropout(nnx.gelu(self.up(self.norm(x))), rngs=rngs)
    return x + scale * self.down(h)


class RematDecoderBlock(DecoderBlock):  # the peer: per-block nnx.remat (no keyword-only arguments)
  @nnx.remat
  def __call__(self, x, rngs, scale=1.0):
    return DecoderBlock.__call__(self, x, rngs, scale=scale)


def _loss(model, rngs):
  return jnp.sum(model(X, rngs, scale=0.5) ** 2)


def _grads_and_count(model):
  rngs = nnx.Rngs(dropout=7)
  grads = nnx.jit(nnx.grad(_loss))(model, rngs)
  return nnx.state(grads, nnx.Param), int(rngs.dropout.count[...])


def _blocks(cls=DecoderBlock):
  rngs = nnx.Rngs(0)
  return [cls(rngs) for _ in range(DEPTH)]


class PlainDecoder(nnx.Module):
  def __init__(self, blocks):
    self.layers = nnx.List(blocks)

  def __call__(self, x, rngs, **kwargs):
    for block in self.layers:
      x = block(x, rngs, **kwargs)
    return x


@pytest.fixture(scope="module")
def plain():
  return _grads_and_count(PlainDecoder(_blocks()))


@pytest.mark.parametrize("seg", [S.every(1), S.every(2), S.revolve(1), S.none(), S.budget(2**20)], ids=repr)
def test_nnx_sequential_with_rngs_at_call_time(seg, plain):
  grads, count = _grads_and_count(remat.nnx.Sequential(*_blocks(), segmenter=seg))
  want, want_count = plain
  assert count == want_count == DEPTH  # each block drew once, recomputation drew nothing new
  assert_same_gradients(grads["layers"], want["layers"])


def test_nnx_sequential_with_rngs_equals_per_block_nnx_remat(plain):
  grads, count = _grads_and_count(PlainDecoder(_blocks(RematDecoderBlock)))
  assert count == plain[1]
  assert_same_gradients(grads["layers"], plain[0]["layers"])


def test_nnx_sequential_counters_advance_over_calls():
  model = remat.nnx.Sequential(*_blocks(), segmenter=S.every(1))
  rngs = nnx.Rngs(dropout=7)
  step = nnx.jit(nnx.grad(_loss))
  first, second = step(model, rngs), step(model, rngs)
  assert int(rngs.dropout.count[...]) == 2 * DEPTH
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), first, second)
  assert max(jax.tree.leaves(diff)) > 0  # the second call drew fresh masks


@pytest.mark.parametrize("seg", [S.every(1), S.every(4), S.budget(2**20)], ids=repr)
def test_nnx_scan_with_rngs_at_call_time(seg):
  def stacked(segmenter):
    return remat.nnx.Scan(lambda r: DecoderBlock(r), length=4, rngs=nnx.Rngs(0), segmenter=segmenter)

  def unrolled_loss(model, rngs):  # the same stack, layer by layer, no checkpoint
    graphdef, params, rest = nnx.split(model.layers, nnx.Param, ...)
    x = X
    for i in range(4):
      pick = lambda a, i=i: a[i]  # noqa: E731
      x = nnx.merge(graphdef, jax.tree.map(pick, params), jax.tree.map(pick, rest))(x, rngs, scale=0.5)
    return jnp.sum(x ** 2)

  rngs = nnx.Rngs(dropout=7)
  want = nnx.state(nnx.jit(nnx.grad(unrolled_loss))(stacked(None), rngs), nnx.Param)
  assert int(rngs.dropout.count[...]) == 4
  grads, count = _grads_and_count(stacked(seg))
  assert count == 4
  assert_same_gradients(grads, want)


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, mask, *, deterministic: bool, cache=None):
    assert cache is None
    h = nn.Dropout(0.3)(jnp.tanh(nn.Dense(WIDTH)(x) * mask), deterministic=deterministic)
    return x + h


@pytest.mark.parametrize("seg,by_keyword",
                         [(S.every(1), False), (S.revolve(1), True), (S.budget(2**20), True)], ids=repr)
def test_linen_sequential_call_time_arrays_flags_and_none(seg, by_keyword):
  mask = (jnp.arange(WIDTH) % 2).astype(jnp.float32)

  def grads(segmenter):
    model = remat.linen.Sequential([LinenBlock() for _ in range(DEPTH)], segmenter=segmenter)
    args, kwargs = ((), {"mask": mask}) if by_keyword else ((mask,), {})
    v = model.init(jax.random.key(0), X, *args, deterministic=True, cache=None, **kwargs)
    loss = lambda v, key: jnp.sum(model.apply(v, X, *args, deterministic=False, cache=None,  # noqa: E731
                                              rngs={"dropout": key}, **kwargs) ** 2)
    return jax.jit(jax.grad(loss))(v, jax.random.key(1))

  assert_same_gradients(grads(seg), grads(None))
