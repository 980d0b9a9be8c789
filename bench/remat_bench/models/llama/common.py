"""What the linen and NNX Llama blocks share: the math, the tag names and MaxText's remat presets.

Both :mod:`~remat_bench.models.llama.linen` and :mod:`~remat_bench.models.llama.nnx` hold
parameters only and call the functions here, so with the same parameters they compute the
same function, operation for operation.

Tags (``jax.ad_checkpoint.checkpoint_name``), placed where MaxText places them:

* ``decoder_layer_input`` — the block input (``maxtext/models/llama2.py``,
  ``LlamaDecoderLayer.__call__``);
* ``query_proj``, ``key_proj``, ``value_proj`` — the projections, reshaped to heads; MaxText
  names query and key *after* the rotary embedding (``maxtext/layers/attentions.py``,
  ``Attention.__call__``: RoPE, sharding constraints, then ``checkpoint_name``), and so do we;
* ``context`` — the attention output before the output projection (MaxText's config:
  "Remat policy for the attention context");
* ``out_proj`` — after the output projection (``Attention.__call__``);
* ``mlpwi_0``, ``mlpwi_1`` — the SwiGLU gate (``silu``) and up (``linear``) projections,
  each its own kernel (``maxtext/layers/linears.py``, ``MlpBlock``: ``"mlp" + dense_name``
  for ``wi_0``/``wi_1``); with ``fused_mlp=True`` one kernel ``wi`` of shape
  ``(width, 2, mlp_dim)`` and the single tag ``mlpwi``, as MaxText's ``fused_mlp``;
* ``mlpwo`` — after the MLP output projection.

Dropout (``dropout_rate``) acts on the attention probabilities and on each residual branch
before it is added; MaxText's Llama layer instead drops the whole layer output, broadcast along
the sequence. The tags do not depend on it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj")
MLP_NAMES = ("mlpwi_0", "mlpwi_1", "mlpwo")
FUSED_MLP_NAMES = ("mlpwi", "mlpwo")


def tag_names(fused_mlp: bool = False) -> tuple[str, ...]:
  """The ``checkpoint_name`` tags of one decoder block, in the order they are computed."""
  return ("decoder_layer_input",) + ATTENTION_NAMES + (FUSED_MLP_NAMES if fused_mlp else MLP_NAMES)


def default_mlp_dim(width: int) -> int:
  """Llama's SwiGLU hidden size: two thirds of ``4 * width``, rounded up to a multiple of 8."""
  return -(-(8 * width // 3) // 8) * 8


### Parameters


def init_param(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """A kernel: normal with standard deviation ``fan_in ** -0.5``; ``fan_in == 0``: ones (norm scales)."""
  if not fan_in:
    return jnp.ones(shape, jnp.float32)
  return jax.random.normal(key, shape, jnp.float32) * fan_in ** -0.5


def embed_init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(key, shape, jnp.float32) * 0.02


def param_specs(width: int, heads: int, mlp_dim: int, fused_mlp: bool) -> dict[str, dict]:
  """``{submodule: {name: (shape, fan_in)}}`` of one block's parameters (see :func:`init_param`)."""
  hd = width // heads
  mlp = ({"wi": ((width, 2, mlp_dim), width)} if fused_mlp else
         {"wi_0": ((width, mlp_dim), width), "wi_1": ((width, mlp_dim), width)})
  mlp["wo"] = ((mlp_dim, width), mlp_dim)
  return {"pre_attention_norm": {"scale": ((width,), 0)},
          "attention": {"query": ((width, heads, hd), width), "key": ((width, heads, hd), width),
                        "value": ((width, heads, hd), width), "out": ((heads, hd, width), width)},
          "pre_mlp_norm": {"scale": ((width,), 0)},
          "mlp": mlp}


def check_shape(width: int, heads: int) -> None:
  if width % heads or (width // heads) % 2:
    raise ValueError(
        f"a Llama block needs `width` divisible by `heads` with an even head size (rotary "
        f"embeddings rotate pairs), but got width={width}, heads={heads}. Use e.g. "
        f"width={heads * max(2, -(-width // heads // 2) * 2)}.")


### The block, as functions of arrays


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
  """``x / rms(x) * scale``, reduced in float32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(dtype)


def rotary(x: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of ``x[batch, length, heads, head_dim]`` at positions ``0..length-1``.

  The rotate-half form (first and second halves of the head dimension are the pairs), with
  timescales ``theta ** (2i / head_dim)``, as MaxText's ``RotaryEmbedding``.
  """
  t, hd = x.shape[1], x.shape[-1]
  timescale = theta ** (2 * jnp.arange(hd // 2, dtype=jnp.float32) / hd)
  angle = jnp.arange(t, dtype=jnp.float32)[:, None] / timescale  # [length, head_dim / 2]
  sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
  a, b = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def attention(p: dict, x: jax.Array, *, dropout: Callable[[jax.Array], jax.Array], theta: float,
              dtype: Any) -> jax.Array:
  """Causal multi-head self-attention of ``x[batch, length, width]``; ``p`` holds the kernels."""
  q = jnp.einsum("btd,dhk->bthk", x, p["query"].astype(dtype))
  k = jnp.einsum("btd,dhk->bthk", x, p["key"].astype(dtype))
  v = jnp.einsum("btd,dhk->bthk", x, p["value"].astype(dtype))
  q = checkpoint_name(rotary(q, theta), "query_proj")
  k = checkpoint_name(rotary(k, theta), "key_proj")
  v = checkpoint_name(v, "value_proj")
  t, hd = x.shape[1], q.shape[-1]
  logits = jnp.einsum("bqhk,bshk->bhqs", q * jnp.asarray(hd ** -0.5, dtype), k).astype(jnp.float32)
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(jnp.float32).min)
  probs = dropout(jax.nn.softmax(logits, axis=-1).astype(dtype))
  context = checkpoint_name(jnp.einsum("bhqs,bshk->bqhk", probs, v), "context")
  return checkpoint_name(jnp.einsum("bqhk,hkd->bqd", context, p["out"].astype(dtype)), "out_proj")


def swiglu(p: dict, x: jax.Array, *, dtype: Any) -> jax.Array:
  """``(silu(x W_gate) * x W_up) W_out``; ``p`` holds ``wi_0``/``wi_1`` (or the fused ``wi``) and ``wo``."""
  if "wi" in p:
    h = checkpoint_name(jnp.einsum("btd,dnf->btnf", x, p["wi"].astype(dtype)), "mlpwi")
    gate, up = h[:, :, 0], h[:, :, 1]
  else:
    gate = checkpoint_name(jnp.einsum("btd,df->btf", x, p["wi_0"].astype(dtype)), "mlpwi_0")
    up = checkpoint_name(jnp.einsum("btd,df->btf", x, p["wi_1"].astype(dtype)), "mlpwi_1")
  h = jax.nn.silu(gate) * up
  return checkpoint_name(jnp.einsum("btf,fd->btd", h, p["wo"].astype(dtype)), "mlpwo")


def block(p: dict, x: jax.Array, *, drop_probs: Callable, drop_attn: Callable, drop_mlp: Callable,
          theta: float, eps: float, dtype: Any) -> jax.Array:
  """Pre-norm residual block: ``x + drop(attn(norm(x)))``, then ``x + drop(mlp(norm(x)))``."""
  x = checkpoint_name(x.astype(dtype), "decoder_layer_input")
  h = rms_norm(x, p["pre_attention_norm"]["scale"], eps, dtype)
  x = x + drop_attn(attention(p["attention"], h, dropout=drop_probs, theta=theta, dtype=dtype))
  h = rms_norm(x, p["pre_mlp_norm"]["scale"], eps, dtype)
  return x + drop_mlp(swiglu(p["mlp"], h, dtype=dtype))


def logits(x: jax.Array, embedding: jax.Array, head: jax.Array | None, dtype: Any) -> jax.Array:
  """Output logits: ``x @ embedding.T`` when tied (``head`` is None), else ``x @ head``."""
  if head is None:
    return jnp.einsum("btd,vd->btv", x, embedding.astype(dtype))
  return jnp.einsum("btd,dv->btv", x, head.astype(dtype))


### MaxText's remat presets

# MaxText's `remat_policy` presets, from `Decoder.get_remat_policy` and `minimal_policy` in
# AI-Hypercomputer/maxtext `src/maxtext/layers/decoders.py` (current main; older versions under
# `MaxText/layers/` lacked `kv_proj` and made `minimal` `checkpoint_dots_with_no_batch_dims` and
# `minimal_offloaded` `offload_dot_with_no_batch_dims`), ordered as its config orders them: fastest
# and most memory first.
# `kv_proj` and `qkv_proj` (MLA and fused-QKV attention) are listed as MaxText lists them; our
# block does not produce them, and a name a block lacks saves nothing.
_QKV = ("query_proj", "value_proj", "key_proj", "kv_proj", "qkv_proj")
_MINIMAL = _QKV + ("out_proj", "mlpwi_0", "mlpwi_1", "mlpwi", "mlpwo")
_SAVED = {
    "minimal_with_context": _MINIMAL + ("context",),
    "minimal": _MINIMAL,
    "save_dot_with_context_except_mlp": _QKV + ("context", "out_proj"),
    "save_dot_except_mlpwi": _QKV + ("out_proj", "mlpwo"),
    "save_dot_except_mlp": _QKV + ("out_proj",),
    "save_qkv_proj": _QKV,
}
_OFFLOADED = {
    "qkv_proj_offloaded": ("query_proj", "value_proj", "key_proj", "kv_proj"),
    "minimal_offloaded": _MINIMAL,
}


@functools.lru_cache(maxsize=None)
def _presets() -> tuple[tuple[str, Any], ...]:
  cp = jax.checkpoint_policies
  out: list[tuple[str, Any]] = [("none", None)]
  out += [(name, cp.save_only_these_names(*names)) for name, names in _SAVED.items()]
  out += [(name, cp.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
      offload_src="device", offload_dst="pinned_host")) for name, names in _OFFLOADED.items()]
  out += [("save_out_proj", cp.save_only_these_names("out_proj")), ("full", cp.nothing_saveable)]
  return tuple(out)


def presets() -> dict[str, Callable[..., Any] | None]:
  """MaxText's ``remat_policy`` presets as jax policies, fastest and most memory first.

  ``"none"`` maps to ``None``: no checkpoint at all (run the block plain; note that
  ``jax.checkpoint(f, policy=None)`` would mean ``"full"``). ``"full"`` is
  ``jax.checkpoint_policies.nothing_saveable`` (only the block's inputs are kept). The
  ``*_offloaded`` presets save nothing on device and offload their names to ``pinned_host``.
  The same policy objects are returned on every call, so they can be compared and hashed.

  Example:

    >>> from remat_bench.models import llama
    >>> list(llama.presets())[:3]
    ['none', 'minimal_with_context', 'minimal']
  """
  return dict(_presets())


def preset_names(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``(saved names, offloaded names)`` of the preset ``name`` (``"full"``/``"none"``: none listed)."""
  if name not in dict(_presets()):
    raise KeyError(f"unknown MaxText remat preset {name!r}; the presets are {list(dict(_presets()))}.")
  return _SAVED.get(name, ("out_proj",) if name == "save_out_proj" else ()), _OFFLOADED.get(name, ())
