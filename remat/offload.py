"""Host offload of checkpoint residuals on XLA memory kinds (see ``remat/_src/core/offload.py``).

``host(...)`` is the runtime policy; ``HostLink`` is the transfer/compute model
that the planner assumes for it.

>>> import remat
>>> policy = remat.offload.host(argnums=1)  # use as remat.checkpoint(f, offload=policy)
"""

from remat._src.core.hostlink import DEFAULT_BANDWIDTH, DEFAULT_COMPUTE_RATE, DEFAULT_LATENCY_S, HostLink
from remat._src.core.offload import (
    DEFAULT_MIN_BYTES,
    HostOffload,
    OffloadNotExecutedWarning,
    Placement,
    host,
    placements,
    supported,
)

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_COMPUTE_RATE",
    "DEFAULT_LATENCY_S",
    "DEFAULT_MIN_BYTES",
    "HostLink",
    "HostOffload",
    "OffloadNotExecutedWarning",
    "Placement",
    "host",
    "placements",
    "supported",
]
