"""Flax linen adapter: checkpoint Module classes with `remat.checkpoint`.

Example:

  >>> import flax.linen as nn, remat
  >>> CheckpointedDense = remat.linen.checkpoint(nn.Dense)
"""

from remat._src.linen import checkpoint

__all__ = ["checkpoint"]
