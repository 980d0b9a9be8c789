"""Flax linen adapter: checkpoint Module classes with `remat.checkpoint`.

Example:

  >>> import flax.linen as nn, remat
  >>> CheckpointedDense = remat.linen.checkpoint(nn.Dense)
"""

from remat._src.adapters.linen import TransformTargetError, checkpoint
from remat._src.adapters.linen_scan import scan
from remat._src.adapters.linen_sequential import Sequential
from remat._src.chains.scanned import NotScannableError, ScanPlan

__all__ = ["NotScannableError", "ScanPlan", "TransformTargetError", "Sequential", "checkpoint", "scan"]
