"""Reading host-offload placements from a program lowered for CUDA (shared by the tests).

XLA:CPU drops memory-kind placements from its lowering (docs/facts.md, fact 5), so
the tests read what would move on a GPU from ``jax.export`` for ``cuda``.
"""

import re
import warnings

import jax

import remat

_PLACEMENT = re.compile(
    r"annotate_device_placement\(%[^)]*\)[^\n]*?_xla_buffer_placement = \"(\w+)\"[^\n]*?: \((tensor<[^>]*>)")


def cuda_placements(fn, *args) -> list[tuple[str, str]]:
  """``(memory kind, tensor type)`` of every placement in ``jit(fn)(*args)`` lowered for CUDA."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  return _PLACEMENT.findall(exported.mlir_module())
