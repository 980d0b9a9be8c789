"""Reference models shared by tests, experiments and notebooks.

``remat_bench.models.linen`` and ``remat_bench.models.nnx`` define the same three models
(an MLP chain, a decoder-only transformer LM with dropout, a small CNN with
BatchNorm), each a stack of blocks with a ``block_wrapper`` option that
applies a checkpointing transform per block. ``remat_bench.models.llama`` is a Llama-style
decoder (linen and NNX) tagged with MaxText's ``checkpoint_name``s, with MaxText's remat
presets. ``remat_bench.models.data`` ships a
text corpus (``corpus.txt``, CPython standard-library docstrings) and
synthetic inputs.
"""

from remat_bench.models import data, linen, llama, nnx

__all__ = ["data", "linen", "llama", "nnx"]
