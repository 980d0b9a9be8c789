"""A GPT-2-style language model in ``flax.linen``, for fitting whole training steps to a memory.

``GPT`` runs its blocks either one by one (each optionally wrapped by
``block_wrapper``, e.g. ``nn.remat``) or, with ``segmenter=``, as one
``remat.linen.Sequential`` chain planned by a segmenter (``remat.segmenters.auto()``
under ``remat.fit``). ``dtype`` is the computation dtype; parameters stay float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import remat


class Block(nn.Module):
  """Pre-LayerNorm GPT-2 block: causal attention and a GELU MLP, dropout on probabilities and residuals."""

  width: int
  heads: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, t, d = x.shape
    hd = d // self.heads
    drop = lambda name: nn.Dropout(self.dropout_rate, deterministic=not train, name=name)  # noqa: E731
    h = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv")(h).reshape(b, t, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(self.dtype)
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min)
    probs = drop("attn_drop")(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype))
    att = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    x = x + drop("drop1")(nn.Dense(d, dtype=self.dtype, name="proj")(att))
    h = nn.Dense(4 * d, dtype=self.dtype, name="fc1")(nn.LayerNorm(dtype=self.dtype, name="ln2")(x))
    return x + drop("drop2")(nn.Dense(d, dtype=self.dtype, name="fc2")(nn.gelu(h)))


class GPT(nn.Module):
  """GPT-2 small by default: 12 blocks of width 768 with 12 heads, here with an 8192-token vocabulary.

  Attributes:
    block_wrapper: applied to :class:`Block` when the blocks run one by one
      (``functools.partial(nn.remat, static_argnums=(2,))``, say).
    segmenter: run the blocks as one ``remat.linen.Sequential`` under this
      segmenter (``block_wrapper`` is then ignored).
  """

  vocab: int = 8192
  seq_len: int = 1024
  depth: int = 12
  width: int = 768
  heads: int = 12
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  block_wrapper: Callable | None = None
  segmenter: Any = None

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    embed = nn.Embed(self.vocab, self.width, name="tok_embed")
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.seq_len, self.width))
    x = (embed(tokens) + pos[:tokens.shape[-1]]).astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train, name="embed_drop")(x)
    make = lambda cls, i: cls(self.width, self.heads, self.dropout_rate, self.dtype, name=f"block_{i}")  # noqa: E731
    if self.segmenter is not None:
      blocks = [Block(self.width, self.heads, self.dropout_rate, self.dtype) for _ in range(self.depth)]
      x = remat.linen.Sequential(blocks, segmenter=self.segmenter, name="blocks")(x, train)
    else:
      cls = Block if self.block_wrapper is None else self.block_wrapper(Block)
      for i in range(self.depth):
        x = make(cls, i)(x, train)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
    return embed.attend(x.astype(jnp.float32))  # tied output embedding, float32 logits


def train_step(model: GPT, optimizer: optax.GradientTransformation) -> Callable:
  """``step(params, opt_state, tokens, key) -> (params, opt_state, loss)``: next-token cross-entropy."""
  def step(params, opt_state, tokens, key):
    def loss_fn(p):
      logits = model.apply(p, tokens, True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def shapes(model: GPT, optimizer: optax.GradientTransformation, batch: int) -> tuple:
  """Specs of ``(params, opt_state, tokens, key)`` for compiling a step without memory."""
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, model.seq_len), jnp.int32)))
  return (params, jax.eval_shape(optimizer.init, params),
          jax.ShapeDtypeStruct((batch, model.seq_len), jnp.int32), jax.random.key(0))
