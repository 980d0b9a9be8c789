"""Host offload of checkpoint residuals on XLA memory kinds (see ``remat/_src/offload.py``).

>>> import remat
>>> policy = remat.offload.host(argnums=1)  # use as remat.checkpoint(f, offload=policy)
"""

from remat._src.offload import (
    DEFAULT_BANDWIDTH,
    DEFAULT_LATENCY_S,
    DEFAULT_MIN_BYTES,
    HostOffload,
    OffloadNotExecutedWarning,
    host,
    supported,
)

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_LATENCY_S",
    "DEFAULT_MIN_BYTES",
    "HostOffload",
    "OffloadNotExecutedWarning",
    "host",
    "supported",
]
