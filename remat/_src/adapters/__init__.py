"""The Flax adapters: linen and NNX checkpoint, Sequential and scan.
"""
