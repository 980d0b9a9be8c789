"""Reference chains for the command line and the experiments.

A chain is a list of layer functions ``layer(p, x)`` or ``layer(p, x, key)``
with one parameter pytree per layer, the form ``remat.sequential`` applies:

* ``mlp``: ``tanh(x @ w)`` layers, the chain of the founding notes;
* ``transformer``: pre-LN transformer blocks with dropout
  (``remat_bench.models.linen.TransformerBlock``) on ``(batch, seq_len, width)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

MODELS = ("mlp", "transformer")


@dataclasses.dataclass(frozen=True)
class Chain:
  """A reference chain of identical layers.

  Attributes:
    model: ``"mlp"`` or ``"transformer"``.
    depth: number of layers.
    width: features per layer.
    batch: batch size.
    seq_len: sequence length (transformer).
    heads: attention heads (transformer).
    dropout_rate: dropout (transformer).
  """

  model: str = "mlp"
  depth: int = 16
  width: int = 256
  batch: int = 512
  seq_len: int = 128
  heads: int = 4
  dropout_rate: float = 0.1

  def __post_init__(self):
    if self.model not in MODELS:
      raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}.")
    for name in ("depth", "width", "batch", "seq_len", "heads"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"`{name}` must be a positive int, but got {v!r}.")
    if self.model == "transformer" and self.width % self.heads:
      raise ValueError(f"`width` ({self.width}) must be divisible by `heads` ({self.heads}).")

  @property
  def layer(self) -> Callable:
    if self.model == "mlp":
      return _mlp_layer
    return _transformer_layer(self.width, self.heads, self.dropout_rate)

  @property
  def layers(self) -> list[Callable]:
    return [self.layer] * self.depth

  @property
  def activation_bytes(self) -> int:
    shape = self.x_spec.shape
    return math.prod(shape) * 4

  @property
  def x_spec(self) -> jax.ShapeDtypeStruct:
    if self.model == "mlp":
      return jax.ShapeDtypeStruct((self.batch, self.width), jnp.float32)
    return jax.ShapeDtypeStruct((self.batch, self.seq_len, self.width), jnp.float32)

  def init(self, seed: int = 0) -> tuple[list[Any], jax.Array, jax.Array | None]:
    """``(params, x, key)``: real arrays for running the chain."""
    keys = jax.random.split(jax.random.key(seed), self.depth + 2)
    x = jax.random.normal(keys[-1], self.x_spec.shape, jnp.float32)
    if self.model == "mlp":
      ws = [jax.random.normal(k, (self.width, self.width)) / math.sqrt(self.width)
            for k in keys[:self.depth]]
      return ws, x, None
    block = _block(self.width, self.heads, self.dropout_rate)
    one = jnp.zeros((1,) + self.x_spec.shape[1:])
    params = [block.init({"params": k}, one, False) for k in keys[:self.depth]]
    return params, x, keys[-2]

  def specs(self) -> tuple[list[Any], jax.ShapeDtypeStruct, Any]:
    """Shapes only (no memory), for planning and compiling."""
    return jax.eval_shape(self.init)

  def chain_fn(self) -> Callable:
    """``run(params, x, key) -> y``: the plain chain (each layer's key tied to its input, as
    ``remat.sequential`` ties them: see :func:`call_layer`)."""
    layer = self.layer

    def run(params, x, key=None):
      for i, p in enumerate(params):
        x = call_layer(layer, p, x, key, i)
      return x

    return run


def call_layer(layer: Callable, p: Any, x: jax.Array, key: Any, i: int) -> jax.Array:
  """Layer ``i`` of a chain: ``layer(p, x)``, or ``layer(p, x, key_i)`` with ``key_i`` tied to ``x``.

  Random bits depend on the key alone, so without the tie XLA:CPU draws every block's dropout
  bits at the start of the step and keeps them all alive (docs/facts.md, fact 11): a forward pass
  of 4, 8 and 16 transformer blocks then needed 41, 73 and 137 activations of temp memory instead
  of 19 (flat). ``remat.sequential`` ties its keys the same way, so every method compares alike.
  """
  if key is None:
    return layer(p, x)
  data, x = jax.lax.optimization_barrier((jax.random.key_data(jax.random.fold_in(key, i)), x))
  return layer(p, x, jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)))


def _mlp_layer(w, x):
  return jnp.tanh(x @ w)


def _block(width, heads, rate):
  from remat_bench.models.linen import TransformerBlock

  return TransformerBlock(width=width, heads=heads, dropout_rate=rate)


_LAYERS: dict[tuple, Callable] = {}


def _transformer_layer(width, heads, rate) -> Callable:
  key = (width, heads, rate)
  if key not in _LAYERS:
    block = _block(width, heads, rate)

    def layer(p, x, key):
      return block.apply(p, x, True, rngs={"dropout": key})

    layer.__name__ = f"transformer_block_{width}x{heads}"
    _LAYERS[key] = layer
  return _LAYERS[key]


def mean_square(y) -> jax.Array:
  """The scalar loss the experiments differentiate: ``mean(y ** 2)``."""
  return jnp.mean(y ** 2)
