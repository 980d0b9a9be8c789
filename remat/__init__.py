"""remat: activation checkpointing (rematerialization) for JAX and Flax."""

from remat import linen, nnx, offload, rng, segmenters
from remat._src.core.compile import CpuFlagsWarning, compiler_options, jit
from remat._src.fitting.fit import FitReport, Fitted, FitWarning, fit
from remat._src.plans.plan import Plan
from remat._src.measure.plan_cache import PlanCacheWarning, plan_cache_dir, set_plan_cache_dir
from remat._src.measure.profile import Profile, Residual, profile, saved_residuals
from remat._src.chains.sequential import sequential
from remat._src.core.transform import RecomputationMismatchError, checkpoint

# Importing remat changes nothing for programs that do not use it: no XLA flag, no jax config
# (docs/facts.md, fact 24; tests/test_do_no_harm.py).

__version__ = "0.1.0"

__all__ = [
    "CpuFlagsWarning",
    "FitReport",
    "FitWarning",
    "Fitted",
    "Plan",
    "PlanCacheWarning",
    "Profile",
    "RecomputationMismatchError",
    "Residual",
    "checkpoint",
    "compiler_options",
    "fit",
    "jit",
    "linen",
    "nnx",
    "offload",
    "plan_cache_dir",
    "profile",
    "rng",
    "saved_residuals",
    "segmenters",
    "sequential",
    "set_plan_cache_dir",
]
