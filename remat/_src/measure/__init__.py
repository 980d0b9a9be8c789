"""Measuring XLA: compiled profiles, per-layer costs, and the persistent plan cache.
"""
