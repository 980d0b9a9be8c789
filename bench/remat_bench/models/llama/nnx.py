"""A Llama-style decoder in ``flax.nnx``: the same function and parameter tree as :mod:`.linen`.

The modules hold parameters; the math is :mod:`remat_bench.models.llama.common`. The LM keeps
its blocks in ``blocks`` and calls each through ``block_wrapper(call_block)`` like the other
NNX reference models::

  LlamaLM(block_wrapper=functools.partial(remat.nnx.checkpoint,
                                          policy=llama.presets()["save_qkv_proj"]), rngs=...)

Dropout follows NNX's mode: ``model.train()`` / ``model.eval()``. A block's parameter state has
the linen block's tree (``attention/query`` ...); the LM's has ``blocks/0`` where linen has
``block_0``. :func:`load_linen_params` copies linen parameters in.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from remat_bench.models.llama import common
from remat_bench.models.nnx import call_block

BlockWrapper = Callable[[Callable], Callable] | None


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale`` (reduced in float32, returned in ``dtype``)."""

  def __init__(self, width: int, *, eps: float = 1e-5, dtype: Any = jnp.float32):
    self.scale = nnx.Param(common.init_param(None, (width,), 0))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    return common.rms_norm(x, self.scale[...], self.eps, self.dtype)


class _Params(nnx.Module):
  """Parameters ``{name: (shape, fan_in)}`` as attributes (see ``common.init_param``)."""

  def __init__(self, specs: dict, rngs: nnx.Rngs):
    for name, (shape, fan_in) in specs.items():
      setattr(self, name, nnx.Param(common.init_param(rngs.params() if fan_in else None, shape, fan_in)))
    self._names = tuple(specs)

  def __call__(self):
    return {name: getattr(self, name)[...] for name in self._names}


class DecoderBlock(nnx.Module):
  """Pre-norm Llama block: causal attention with rotary embeddings, then a SwiGLU MLP.

  Args:
    width, heads, mlp_dim, dropout_rate, dtype, rope_theta, eps, fused_mlp: as in
      :class:`remat_bench.models.llama.linen.DecoderBlock`.
    rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` when ``dropout_rate > 0``).
  """

  def __init__(self, width: int, heads: int, mlp_dim: int = 0, dropout_rate: float = 0.0,
               dtype: Any = jnp.float32, rope_theta: float = 10_000.0, eps: float = 1e-5,
               fused_mlp: bool = False, *, rngs: nnx.Rngs):
    common.check_shape(width, heads)
    specs = common.param_specs(width, heads, mlp_dim or common.default_mlp_dim(width), fused_mlp)
    self.pre_attention_norm = _Params(specs["pre_attention_norm"], rngs)
    self.attention = _Params(specs["attention"], rngs)
    self.pre_mlp_norm = _Params(specs["pre_mlp_norm"], rngs)
    self.mlp = _Params(specs["mlp"], rngs)
    self.drop_probs = nnx.Dropout(dropout_rate, rngs=rngs)
    self.drop_attn = nnx.Dropout(dropout_rate, rngs=rngs)
    self.drop_mlp = nnx.Dropout(dropout_rate, rngs=rngs)
    self.rope_theta, self.eps, self.dtype = rope_theta, eps, dtype

  def __call__(self, x):
    p = {name: getattr(self, name)() for name in ("pre_attention_norm", "attention", "pre_mlp_norm", "mlp")}
    return common.block(p, x, drop_probs=self.drop_probs, drop_attn=self.drop_attn,
                        drop_mlp=self.drop_mlp, theta=self.rope_theta, eps=self.eps, dtype=self.dtype)


class LlamaLM(nnx.Module):
  """A small Llama-style language model: embedding, ``depth`` blocks, final RMSNorm, head.

  Args:
    vocab, depth, width, heads, mlp_dim, dropout_rate, dtype, rope_theta, eps, fused_mlp,
      tie_embeddings: as in :class:`remat_bench.models.llama.linen.LlamaLM`.
    block_wrapper: a function transform (``remat.nnx.checkpoint``, ``nnx.remat``) applied to
      ``call_block(block, x)``.
    rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` when ``dropout_rate > 0``).
  """

  def __init__(self, vocab: int = 96, depth: int = 2, width: int = 64, heads: int = 4,
               mlp_dim: int = 0, dropout_rate: float = 0.0, dtype: Any = jnp.float32,
               rope_theta: float = 10_000.0, eps: float = 1e-5, fused_mlp: bool = False,
               tie_embeddings: bool = True, *, block_wrapper: BlockWrapper = None, rngs: nnx.Rngs):
    self.embedding = nnx.Param(common.embed_init(rngs.params(), (vocab, width)))
    self.blocks = nnx.List([
        DecoderBlock(width, heads, mlp_dim, dropout_rate, dtype, rope_theta, eps, fused_mlp, rngs=rngs)
        for _ in range(depth)])
    self.final_norm = RMSNorm(width, eps=eps, dtype=dtype)
    self.head = (None if tie_embeddings else
                 nnx.Param(common.init_param(rngs.params(), (width, vocab), width)))
    self.block_wrapper, self.dtype = block_wrapper, dtype

  def __call__(self, tokens):
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    fn = call_block if self.block_wrapper is None else self.block_wrapper(call_block)
    for block in self.blocks:
      x = fn(block, x)
    head = None if self.head is None else self.head[...]
    return common.logits(self.final_norm(x), self.embedding[...], head, self.dtype)


def load_linen_params(model: nnx.Module, params: Any) -> None:
  """Copies the parameters of the linen twin of ``model`` into it (in place).

  Args:
    model: a :class:`DecoderBlock` or :class:`LlamaLM`.
    params: the linen model's ``params`` collection (or its variables, ``{"params": ...}``),
      with the same configuration.

  Raises:
    ValueError: if the trees do not match (different configuration).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from remat_bench.models.llama import linen, nnx as llama_nnx
    >>> tokens = jnp.zeros((1, 8), jnp.int32)
    >>> v = linen.LlamaLM(depth=1).init(jax.random.key(0), tokens)
    >>> m = llama_nnx.LlamaLM(depth=1, rngs=nnx.Rngs(1))
    >>> llama_nnx.load_linen_params(m, v)
    >>> bool(jnp.all(m(tokens) == linen.LlamaLM(depth=1).apply(v, tokens)))
    True
  """
  params = dict(params.get("params", params))
  if isinstance(model, LlamaLM):
    blocks = {i: params.pop(f"block_{i}", None) for i in range(len(model.blocks))}
    params["blocks"] = blocks
  state = nnx.state(model, nnx.Param)
  want = jax.tree_util.tree_map(jnp.shape, nnx.to_pure_dict(state))
  got = jax.tree_util.tree_map(jnp.shape, params)
  if want != got:
    raise ValueError(
        f"`load_linen_params`: the linen parameters do not match `{type(model).__name__}`: expected "
        f"the shapes {want}, got {got}. Build both models with the same configuration.")
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
