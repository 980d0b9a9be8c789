"""The transform and its runtime: remat.checkpoint, its tangent rules and barriers, policies, PRNG
keys, host offload, and remat's compiler options.
"""
