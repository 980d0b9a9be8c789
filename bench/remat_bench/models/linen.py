"""Reference models in ``flax.linen``: an MLP chain, a decoder-only transformer LM, a CNN.

Every model is a stack of blocks built by one Module class, and takes a
``block_wrapper``: a function from that class to a Module class, applied once
to the block class, so checkpointing is chosen per model without editing it::

  TransformerLM(..., block_wrapper=functools.partial(
      remat.linen.checkpoint, static_argnums=(2,)))   # ours
  TransformerLM(..., block_wrapper=functools.partial(
      nn.remat, static_argnums=(2,)))                 # flax's

Blocks take ``(x, train)``; ``train`` is position 2 counting ``self``. Wrapped
blocks get explicit names (``block_0`` …), so the parameter tree is the same
with and without a wrapper.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

BlockWrapper = Callable[[type[nn.Module]], type[nn.Module]] | None


def _wrap(cls, block_wrapper):
  return cls if block_wrapper is None else block_wrapper(cls)


### MLP chain


class MLPBlock(nn.Module):
  """``tanh(x @ W + b)``: one layer of the chain (width to width)."""

  width: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return jnp.tanh(nn.Dense(self.width, name="dense")(x))


class MLP(nn.Module):
  """A chain of ``depth`` :class:`MLPBlock` layers, and an optional linear head.

  Attributes:
    depth: number of blocks.
    width: features of every block.
    out_features: size of the final linear head (``0``: no head).
    block_wrapper: applied to :class:`MLPBlock` (e.g. ``remat.linen.checkpoint``).
  """

  depth: int = 4
  width: int = 64
  out_features: int = 0
  block_wrapper: BlockWrapper = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = _wrap(MLPBlock, self.block_wrapper)
    for i in range(self.depth):
      x = block(self.width, name=f"block_{i}")(x, train)
    if self.out_features:
      x = nn.Dense(self.out_features, name="head")(x)
    return x


### Transformer LM


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with attention-probability dropout."""

  width: int
  heads: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, t, d = x.shape
    hd = d // self.heads
    qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, t, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.dropout_rate, deterministic=not train, name="attn_drop")(probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return nn.Dense(d, name="proj")(out)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm transformer block: attention and a GELU MLP, each with residual dropout."""

  width: int
  heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = CausalSelfAttention(self.width, self.heads, self.dropout_rate, name="attn")(
        nn.LayerNorm(name="ln1")(x), train)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train, name="drop1")(h)
    h = nn.Dense(self.mlp_ratio * self.width, name="fc1")(nn.LayerNorm(name="ln2")(x))
    h = nn.Dense(self.width, name="fc2")(nn.gelu(h))
    return x + nn.Dropout(self.dropout_rate, deterministic=not train, name="drop2")(h)


class TransformerLM(nn.Module):
  """A decoder-only (GPT-style) language model over token ids.

  Attributes:
    vocab: vocabulary size.
    seq_len: maximum sequence length (learned position embeddings).
    depth: number of :class:`TransformerBlock` blocks.
    width: model width.
    heads: attention heads (``width`` must be divisible by it).
    mlp_ratio: hidden width of the MLP, in multiples of ``width``.
    dropout_rate: dropout on embeddings, attention probabilities and residuals.
    block_wrapper: applied to :class:`TransformerBlock`; its ``__call__`` is
      ``(self, x, train)``, so ``train`` is static argument 2.
  """

  vocab: int = 96
  seq_len: int = 64
  depth: int = 2
  width: int = 64
  heads: int = 4
  mlp_ratio: int = 4
  dropout_rate: float = 0.1
  block_wrapper: BlockWrapper = None

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    t = tokens.shape[-1]
    x = nn.Embed(self.vocab, self.width, name="tok_embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.seq_len, self.width))
    x = nn.Dropout(self.dropout_rate, deterministic=not train, name="embed_drop")(x + pos[:t])
    block = _wrap(TransformerBlock, self.block_wrapper)
    for i in range(self.depth):
      x = block(self.width, self.heads, self.mlp_ratio, self.dropout_rate, name=f"block_{i}")(
          x, train)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.vocab, name="head")(x)


### CNN with BatchNorm


class ConvBlock(nn.Module):
  """3x3 convolution, BatchNorm and ReLU (channels to channels)."""

  channels: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.channels, (3, 3), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.relu(x)


class CNN(nn.Module):
  """A small image classifier: stem convolution, ``depth`` :class:`ConvBlock`, mean pool, head.

  Attributes:
    depth: number of blocks.
    channels: channels of every block.
    num_classes: size of the output logits.
    block_wrapper: applied to :class:`ConvBlock` (``train`` is static argument 2).
  """

  depth: int = 3
  channels: int = 16
  num_classes: int = 10
  block_wrapper: BlockWrapper = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.channels, (3, 3), name="stem")(x)
    block = _wrap(ConvBlock, self.block_wrapper)
    for i in range(self.depth):
      x = block(self.channels, name=f"block_{i}")(x, train)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))
