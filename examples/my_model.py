"""Your own model on the command line: `remat plan --model examples/my_model.py:model`.

A factory returns a dict that says what to plan: the chain of blocks (`"module"`), an example batch
(`"x"`; a `jax.ShapeDtypeStruct` allocates nothing) and the extra arguments every block takes
(`"args"`). remat initialises the parameters as shapes (`jax.eval_shape`), plans, and compiles the
training step of the chain to check the plan. Size flags given on the command line (`--depth`,
`--batch` ...) are passed to a factory that accepts them as keywords.

    remat plan --model examples/my_model.py:model --segmenter sqrt
    remat plan --model examples/my_model.py:model --depth 12 --segmenter budget:200MiB
    remat plan --model examples/my_model.py:mlp --segmenter revolve:3

`remat plan --help` lists every key a factory may return.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
  """The README's block: a residual MLP with dropout, called as `block(x, train)`."""

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dropout(0.1, deterministic=not train)(nn.gelu(nn.Dense(4 * x.shape[-1])(x)))
    return x + nn.Dense(x.shape[-1])(h)


def model(depth: int = 8, batch: int = 8, seq_len: int = 256, width: int = 256):
  """A chain of linen blocks: `nn.Sequential` plus a batch, trained (`train=True`: dropout on)."""
  return {
      "module": nn.Sequential([Block() for _ in range(depth)]),
      "x": jax.ShapeDtypeStruct((batch, seq_len, width), jnp.float32),
      "args": (True,),  # every block is called as block(x, True); dropout keys come from remat
  }


def mlp(depth: int = 16, batch: int = 512, width: int = 256):
  """A chain of plain functions `layer(w, x)` with one weight each, as `remat.sequential` takes."""
  return {
      "layers": [lambda w, x: jnp.tanh(x @ w)] * depth,
      "params": [jax.ShapeDtypeStruct((width, width), jnp.float32)] * depth,
      "x": jax.ShapeDtypeStruct((batch, width), jnp.float32),
  }
