"""Planners that compile: budget (one chain) and remat.fit (a whole training step).
"""
