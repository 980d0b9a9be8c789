"""Segmenters: where to checkpoint a chain of layers, and the plans they make.

``every(k)``, ``sqrt()``, ``multilevel(levels)``, ``none()`` and ``revolve(slots)``
need only the number of layers; ``budget(max_bytes)`` plans from costs measured
from XLA (``measure_costs``). Each ``.plan(costs)`` returns a ``Plan``; apply it
with ``remat.sequential``.
"""

from remat._src.costs import measure_costs
from remat._src.plan import LayerCost, Plan, Segment
from remat._src.segmenters import (
    budget,
    every,
    multilevel,
    none,
    offload_candidates,
    revolve,
    revolve_evaluations,
    sqrt,
)
from remat._src.sequential import plan_for_chain as plan_for

__all__ = [
    "LayerCost",
    "Plan",
    "Segment",
    "budget",
    "every",
    "measure_costs",
    "multilevel",
    "none",
    "offload_candidates",
    "plan_for",
    "revolve",
    "revolve_evaluations",
    "sqrt",
]
