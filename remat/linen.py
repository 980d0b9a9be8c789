"""Flax linen adapter: checkpoint Module classes with `remat.checkpoint`.

Example:

  >>> import flax.linen as nn, remat
  >>> CheckpointedDense = remat.linen.checkpoint(nn.Dense)
"""

from remat._src.linen import TransformTargetError, checkpoint
from remat._src.linen_sequential import Sequential

__all__ = ["TransformTargetError", "Sequential", "checkpoint"]
