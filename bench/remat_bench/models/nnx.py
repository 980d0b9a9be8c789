"""Reference models in ``flax.nnx``: an MLP chain, a decoder-only transformer LM, a CNN.

The same architectures as :mod:`remat_bench.models.linen`. Each model keeps its
blocks in a list attribute ``blocks`` and calls every block through
``block_wrapper(call_block)``, where ``call_block(block, x)`` is
``block(x)``. Pass a function transform to checkpoint per block::

  TransformerLM(..., block_wrapper=remat.nnx.checkpoint)   # ours
  TransformerLM(..., block_wrapper=nnx.remat)              # flax's

Training or evaluation mode is the NNX one: ``model.train()`` /
``model.eval()`` (dropout and BatchNorm attributes).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

BlockWrapper = Callable[[Callable], Callable] | None


def call_block(block: nnx.Module, x: jax.Array) -> jax.Array:
  """``block(x)``: the function ``block_wrapper`` transforms."""
  return block(x)


class _Stack(nnx.Module):
  """Runs ``self.blocks`` in order, each through ``block_wrapper(call_block)``."""

  def _run_blocks(self, x):
    fn = call_block if self.block_wrapper is None else self.block_wrapper(call_block)
    for block in self.blocks:
      x = fn(block, x)
    return x


### MLP chain


class MLPBlock(nnx.Module):
  """``tanh(x @ W + b)``: one layer of the chain (width to width)."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.dense(x))


class MLP(_Stack):
  """A chain of ``depth`` :class:`MLPBlock` layers and an optional linear head.

  Args:
    depth: number of blocks.
    width: features of every block (the input has ``width`` features too).
    out_features: size of the final linear head (``0``: no head).
    block_wrapper: a function transform (``remat.nnx.checkpoint``, ``nnx.remat``).
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, depth: int = 4, width: int = 64, out_features: int = 0, *,
               block_wrapper: BlockWrapper = None, rngs: nnx.Rngs):
    self.block_wrapper = block_wrapper
    self.blocks = nnx.List([MLPBlock(width, rngs=rngs) for _ in range(depth)])
    self.head = nnx.Linear(width, out_features, rngs=rngs) if out_features else None

  def __call__(self, x):
    x = self._run_blocks(x)
    return self.head(x) if self.head is not None else x


### Transformer LM


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with attention-probability dropout."""

  def __init__(self, width: int, heads: int, dropout_rate: float = 0.0, *, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.attn_drop = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    hd = d // self.heads
    qkv = self.qkv(x).reshape(b, t, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = self.attn_drop(jax.nn.softmax(logits, axis=-1))
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return self.proj(out)


class TransformerBlock(nnx.Module):
  """Pre-LayerNorm transformer block: attention and a GELU MLP, each with residual dropout."""

  def __init__(self, width: int, heads: int, mlp_ratio: int = 4, dropout_rate: float = 0.0, *,
               rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = CausalSelfAttention(width, heads, dropout_rate, rngs=rngs)
    self.drop1 = nnx.Dropout(dropout_rate, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * width, width, rngs=rngs)
    self.drop2 = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x):
    x = x + self.drop1(self.attn(self.ln1(x)))
    h = self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))
    return x + self.drop2(h)


class TransformerLM(_Stack):
  """A decoder-only (GPT-style) language model over token ids.

  Args:
    vocab: vocabulary size.
    seq_len: maximum sequence length (learned position embeddings).
    depth: number of :class:`TransformerBlock` blocks.
    width: model width.
    heads: attention heads (``width`` must be divisible by it).
    mlp_ratio: hidden width of the MLP, in multiples of ``width``.
    dropout_rate: dropout on embeddings, attention probabilities and residuals.
    block_wrapper: a function transform (``remat.nnx.checkpoint``, ``nnx.remat``).
    rngs: ``nnx.Rngs`` with ``params`` and ``dropout`` streams.
  """

  def __init__(self, vocab: int = 96, seq_len: int = 64, depth: int = 2, width: int = 64,
               heads: int = 4, mlp_ratio: int = 4, dropout_rate: float = 0.1, *,
               block_wrapper: BlockWrapper = None, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"`TransformerLM` needs `width` divisible by `heads`, got {width} and {heads}.")
    self.block_wrapper = block_wrapper
    self.tok_embed = nnx.Embed(vocab, width, rngs=rngs)
    self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (seq_len, width)) * 0.02)
    self.embed_drop = nnx.Dropout(dropout_rate, rngs=rngs)
    self.blocks = nnx.List([TransformerBlock(width, heads, mlp_ratio, dropout_rate, rngs=rngs)
                            for _ in range(depth)])
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens):
    t = tokens.shape[-1]
    x = self.embed_drop(self.tok_embed(tokens) + self.pos_embed[...][:t])
    x = self._run_blocks(x)
    return self.head(self.ln_f(x))


### CNN with BatchNorm


class ConvBlock(nnx.Module):
  """3x3 convolution, BatchNorm and ReLU (channels to channels)."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


class CNN(_Stack):
  """A small image classifier: stem convolution, ``depth`` :class:`ConvBlock`, mean pool, head.

  Args:
    in_channels: channels of the input images.
    depth: number of blocks.
    channels: channels of every block.
    num_classes: size of the output logits.
    block_wrapper: a function transform (``remat.nnx.checkpoint``, ``nnx.remat``).
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, in_channels: int = 3, depth: int = 3, channels: int = 16,
               num_classes: int = 10, *, block_wrapper: BlockWrapper = None, rngs: nnx.Rngs):
    self.block_wrapper = block_wrapper
    self.stem = nnx.Conv(in_channels, channels, (3, 3), rngs=rngs)
    self.blocks = nnx.List([ConvBlock(channels, rngs=rngs) for _ in range(depth)])
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self._run_blocks(self.stem(x))
    return self.head(x.mean(axis=(1, 2)))
