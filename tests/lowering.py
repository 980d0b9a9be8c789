"""Host-offload placements of a program lowered for CUDA, as ``(memory kind, tensor type)`` pairs.

XLA:CPU drops memory-kind placements from its lowering (docs/facts.md, fact 5), so
the tests read what would move on a GPU from ``remat.offload.placements``.
"""

import warnings

import remat


def cuda_placements(fn, *args) -> list[tuple[str, str]]:
  """``(memory kind, tensor type)`` of every placement in ``jit(fn)(*args)`` lowered for CUDA."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    return [(p.memory_kind, p.type) for p in remat.offload.placements(fn, *args, platform="cuda")]
