"""remat: activation checkpointing (rematerialization) for JAX and Flax."""

from remat import linen, nnx, offload, rng, segmenters
from remat._src import compile as _compile
from remat._src.compile import CpuFlagsWarning, compiler_options, jit
from remat._src.fit import FitReport, Fitted, fit
from remat._src.plan import Plan
from remat._src.profile import Profile, Residual, profile, saved_residuals
from remat._src.sequential import sequential
from remat._src.transform import RecomputationMismatchError, checkpoint

# While jax's CPU backend has not started (importing jax, flax and the modules
# above does not start it; tests/test_cpu_flags.py checks): XLA_FLAGS that make
# plain `jax.jit` keep checkpoints on CPU (docs/facts.md, fact 14). Opt out with
# REMAT_NO_XLA_FLAGS=1.
_compile.install_xla_flags()

__version__ = "0.1.0"

__all__ = [
    "CpuFlagsWarning",
    "FitReport",
    "Fitted",
    "Plan",
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
    "profile",
    "rng",
    "saved_residuals",
    "segmenters",
    "sequential",
]
