"""Flax linen adapter: checkpoint Module classes with `remat.checkpoint`.

Example:

  >>> import flax.linen as nn, remat
  >>> CheckpointedDense = remat.linen.checkpoint(nn.Dense)
"""

from remat._src.linen import TransformTargetError, checkpoint
from remat._src.linen_scan import scan
from remat._src.linen_sequential import Sequential
from remat._src.scanned import NotScannableError, ScanPlan

__all__ = ["NotScannableError", "ScanPlan", "TransformTargetError", "Sequential", "checkpoint", "scan"]
