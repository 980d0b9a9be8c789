"""Reference models shared by tests, experiments and notebooks.

``remat.models.linen`` and ``remat.models.nnx`` define the same three models
(an MLP chain, a decoder-only transformer LM with dropout, a small CNN with
BatchNorm), each a stack of blocks with a ``block_wrapper`` option that
applies a checkpointing transform per block. ``remat.models.data`` ships a
text corpus (``corpus.txt``, CPython standard-library docstrings) and
synthetic inputs.
"""

from remat.models import data, linen, nnx

__all__ = ["data", "linen", "nnx"]
