"""Explicit PRNG-key threading for checkpointed code (see ``remat/_src/core/rng.py``)."""

from remat._src.core.rng import dropout, layer_key, layer_keys

__all__ = ["dropout", "layer_key", "layer_keys"]
