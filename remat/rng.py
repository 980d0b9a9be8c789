"""Explicit PRNG-key threading for checkpointed code (see ``remat/_src/rng.py``)."""

from remat._src.rng import dropout, layer_key, layer_keys

__all__ = ["dropout", "layer_key", "layer_keys"]
