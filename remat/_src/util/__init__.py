"""Utilities every layer may use: sizes, array specs, signatures, pytree types, and the one place that
names private jax/flax APIs (compat).
"""
