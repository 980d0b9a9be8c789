"""A Llama-style decoder in ``flax.linen``: RMSNorm, rotary embeddings, causal attention, SwiGLU.

The modules hold parameters; the math is :mod:`remat_bench.models.llama.common`, shared with
the NNX version, and tags its intermediates with ``jax.ad_checkpoint.checkpoint_name`` as
MaxText does (see that module). Blocks take ``(x, train)`` like the other reference models,
so ``train`` is static argument 2 of a wrapper::

  LlamaLM(block_wrapper=functools.partial(remat.linen.checkpoint, static_argnums=(2,),
                                          policy=llama.presets()["save_qkv_proj"]))

Parameter tree of a block (no biases)::

  pre_attention_norm/scale [width]      attention/{query,key,value} [width, heads, head_dim]
  pre_mlp_norm/scale [width]            attention/out [heads, head_dim, width]
  mlp/wi_0, mlp/wi_1 [width, mlp_dim]   (fused_mlp: mlp/wi [width, 2, mlp_dim])
  mlp/wo [mlp_dim, width]
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from remat_bench.models.llama import common

BlockWrapper = Callable[[type[nn.Module]], type[nn.Module]] | None


class RMSNorm(nn.Module):
  """``x / rms(x) * scale`` (reduced in float32, returned in ``dtype``)."""

  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", common.init_param, (x.shape[-1],), 0)
    return common.rms_norm(x, scale, self.eps, self.dtype)


class _Params(nn.Module):
  """A submodule holding parameters ``{name: (shape, fan_in)}`` (see ``common.init_param``)."""

  specs: dict

  @nn.compact
  def __call__(self):
    return {name: self.param(name, common.init_param, shape, fan_in)
            for name, (shape, fan_in) in self.specs.items()}


class DecoderBlock(nn.Module):
  """Pre-norm Llama block: causal attention with rotary embeddings, then a SwiGLU MLP.

  Attributes:
    width: model width.
    heads: attention heads (``width // heads`` must be even).
    mlp_dim: SwiGLU hidden size (``0``: ``common.default_mlp_dim(width)``).
    dropout_rate: dropout on attention probabilities and on both residual branches.
    dtype: computation dtype (parameters stay float32).
    rope_theta: rotary embedding base.
    eps: RMSNorm epsilon.
    fused_mlp: one ``wi`` kernel for gate and up projections, tagged ``mlpwi`` (MaxText's
      ``fused_mlp``) instead of ``wi_0``/``wi_1`` tagged ``mlpwi_0``/``mlpwi_1``.
  """

  width: int
  heads: int
  mlp_dim: int = 0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  rope_theta: float = 10_000.0
  eps: float = 1e-5
  fused_mlp: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    common.check_shape(self.width, self.heads)
    specs = common.param_specs(self.width, self.heads,
                               self.mlp_dim or common.default_mlp_dim(self.width), self.fused_mlp)
    p = {name: _Params(spec, name=name)() for name, spec in specs.items()}
    drop = lambda name: nn.Dropout(self.dropout_rate, deterministic=not train, name=name)  # noqa: E731
    return common.block(p, x, drop_probs=drop("drop_probs"), drop_attn=drop("drop_attn"),
                        drop_mlp=drop("drop_mlp"), theta=self.rope_theta, eps=self.eps, dtype=self.dtype)


class LlamaLM(nn.Module):
  """A small Llama-style language model: embedding, ``depth`` blocks, final RMSNorm, head.

  Attributes:
    vocab: vocabulary size.
    depth: number of :class:`DecoderBlock` blocks (named ``block_0`` ...).
    width, heads, mlp_dim, dropout_rate, dtype, rope_theta, eps, fused_mlp: as in
      :class:`DecoderBlock`.
    tie_embeddings: the head is the transposed embedding (else its own ``head`` kernel).
    block_wrapper: applied to :class:`DecoderBlock` (``train`` is static argument 2).
  """

  vocab: int = 96
  depth: int = 2
  width: int = 64
  heads: int = 4
  mlp_dim: int = 0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  rope_theta: float = 10_000.0
  eps: float = 1e-5
  fused_mlp: bool = False
  tie_embeddings: bool = True
  block_wrapper: BlockWrapper = None

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    embedding = self.param("embedding", common.embed_init, (self.vocab, self.width))
    x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
    block = DecoderBlock if self.block_wrapper is None else self.block_wrapper(DecoderBlock)
    for i in range(self.depth):
      x = block(self.width, self.heads, self.mlp_dim, self.dropout_rate, self.dtype,
                self.rope_theta, self.eps, self.fused_mlp, name=f"block_{i}")(x, train)
    x = RMSNorm(self.eps, self.dtype, name="final_norm")(x)
    head = None if self.tie_embeddings else self.param(
        "head", common.init_param, (self.width, self.vocab), self.width)
    return common.logits(x, embedding, head, self.dtype)
