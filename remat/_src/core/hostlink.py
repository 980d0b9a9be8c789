"""``HostLink``: the assumed speed of the host link and of compute, for planning offload.

The planner keeps a value in host memory when its transfer hides behind the
compute that runs meanwhile. These are assumptions, not measurements
(docs/facts.md, fact 15): measure your machine and pass ``bandwidth=``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

# One-direction host<->device bandwidth in bytes/s with pinned buffers, by backend:
#   gpu: PCIe 5.0 x16 (H100/H200 hosts) about 50 GB/s (PCIe 4.0: about 25 GB/s);
#   tpu: a PCIe 4.0 x16-class link per chip; cpu: nothing moves, modelling only.
DEFAULT_BANDWIDTH: dict[str, float] = {"gpu": 50e9, "tpu": 25e9, "cpu": 10e9}
# Sustained flop/s a transfer can hide behind (a float32/TF32 matmul mix).
DEFAULT_COMPUTE_RATE: dict[str, float] = {"gpu": 2e14, "tpu": 2e14, "cpu": 1e11}
# Fixed cost of one transfer (DMA setup and synchronisation), in seconds.
DEFAULT_LATENCY_S = 10e-6

_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_API = "`remat.offload.HostLink`"


def platform(name: str | None) -> str:
  """``"gpu"`` for ``"cuda"``/``"rocm"``; the default backend for ``None``."""
  name = (name or jax.default_backend()).lower()
  return _PLATFORM_ALIASES.get(name, name)


@dataclasses.dataclass(frozen=True)
class HostLink:
  """Transfer and compute rates that a planner assumes.

  Attributes:
    bandwidth: one-direction bytes/s, or ``None`` for ``DEFAULT_BANDWIDTH`` of the backend.
    latency: fixed seconds per transfer.

  Example:

    >>> from remat.offload import HostLink
    >>> link = HostLink(bandwidth=1e9, latency=0.0)
    >>> link.transfer_seconds(5e8), link.compute_seconds(2e14, backend="gpu")
    (0.5, 1.0)
  """

  bandwidth: float | None = None
  latency: float = DEFAULT_LATENCY_S

  def __post_init__(self):
    if self.bandwidth is not None:
      if not _is_real(self.bandwidth) or not math.isfinite(self.bandwidth) or self.bandwidth <= 0:
        raise ValueError(
            f"the `bandwidth` argument to {_API} must be None or a positive, finite number of bytes "
            f"per second, but got {self.bandwidth!r}, e.g. `bandwidth=25e9` for a PCIe 4.0 x16 link.")
      object.__setattr__(self, "bandwidth", float(self.bandwidth))
    if not _is_real(self.latency) or not math.isfinite(self.latency) or self.latency < 0:
      raise ValueError(
          f"the `latency` argument to {_API} must be a non-negative number of seconds, but got "
          f"{self.latency!r}.")
    object.__setattr__(self, "latency", float(self.latency))

  def link_bandwidth(self, backend: str | None = None) -> float:
    """``bandwidth``, or the default of ``backend`` (default: ``jax.default_backend()``)."""
    if self.bandwidth is not None:
      return self.bandwidth
    return DEFAULT_BANDWIDTH.get(platform(backend), DEFAULT_BANDWIDTH["gpu"])

  def transfer_seconds(self, nbytes: float, *, backend: str | None = None) -> float:
    """``latency + nbytes / bandwidth`` for one direction (0 for nothing to move)."""
    if nbytes <= 0:
      return 0.0
    return self.latency + float(nbytes) / self.link_bandwidth(backend)

  def compute_seconds(self, flops: float, *, backend: str | None = None) -> float:
    """``flops`` at ``DEFAULT_COMPUTE_RATE`` of ``backend``."""
    return float(flops) / DEFAULT_COMPUTE_RATE.get(platform(backend), DEFAULT_COMPUTE_RATE["gpu"])

  def exposed_seconds(self, nbytes: float, flops: float, *, backend: str | None = None) -> float:
    """A round trip of ``nbytes`` (out in the forward pass, back in the backward) less what
    hides behind ``flops`` of compute each way."""
    one_way = self.transfer_seconds(nbytes, backend=backend) - self.compute_seconds(flops, backend=backend)
    return 2.0 * max(0.0, one_way)


def _is_real(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
