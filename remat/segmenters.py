"""Segmenters: where to checkpoint a chain of layers, and the plans they make.

``every(k)``, ``sqrt()``, ``multilevel(levels)``, ``none()`` and ``revolve(slots)``
need only the number of layers; ``budget(max_bytes)`` plans from costs measured
from XLA (``measure_costs``). Each follows the ``Segmenter`` protocol: ``.plan(chain)``
(a number of layers or per-layer costs) returns a ``Plan``; apply it with ``remat.sequential``.
"""

from remat._src.fitting.budget import GlobalShapesWarning, budget, min_feasible_bytes, offload_candidates
from remat._src.measure.costs import measure_costs
from remat._src.fitting.fit import auto
from remat._src.plans.plan import LayerCost, Plan, Segment, Verifier
from remat._src.plans.segmenters import (
    Chain,
    Segmenter,
    every,
    multilevel,
    none,
    revolve,
    revolve_evaluations,
    sqrt,
)

__all__ = [
    "Chain",
    "GlobalShapesWarning",
    "LayerCost",
    "Plan",
    "Segment",
    "Segmenter",
    "Verifier",
    "auto",
    "budget",
    "every",
    "measure_costs",
    "min_feasible_bytes",
    "multilevel",
    "none",
    "offload_candidates",
    "revolve",
    "revolve_evaluations",
    "sqrt",
]
