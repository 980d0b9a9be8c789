"""Flax NNX adapter: checkpoint functions of NNX modules with `remat.checkpoint`.

Example:

  >>> import remat
  >>> f = remat.nnx.checkpoint(lambda m, x: m(x))
"""

from remat._src.adapters.nnx import BoundMethodError, checkpoint
from remat._src.adapters.nnx_scan import Scan, scan, stack
from remat._src.adapters.nnx_sequential import Sequential
from remat._src.chains.scanned import NotScannableError, ScanPlan

__all__ = ["BoundMethodError", "NotScannableError", "Scan", "ScanPlan", "Sequential", "checkpoint", "scan",
           "stack"]
