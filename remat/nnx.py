"""Flax NNX adapter: checkpoint functions of NNX modules with `remat.checkpoint`.

Example:

  >>> import remat
  >>> f = remat.nnx.checkpoint(lambda m, x: m(x))
"""

from remat._src.nnx import checkpoint

__all__ = ["checkpoint"]
