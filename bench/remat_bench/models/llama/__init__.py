"""A Llama-style decoder (RMSNorm, rotary embeddings, causal attention, SwiGLU) in linen and NNX.

Its intermediates carry MaxText's ``checkpoint_name`` tags (``decoder_layer_input``,
``query_proj``, ``key_proj``, ``value_proj``, ``context``, ``out_proj``, ``mlpwi_0``/``mlpwi_1``
or ``mlpwi``, ``mlpwo``), so per-tensor policies such as MaxText's ``remat_policy`` presets
(:func:`presets`) apply to it. ``llama.linen`` and ``llama.nnx`` compute the same function with
the same parameters (``llama.nnx.load_linen_params`` copies linen parameters into an NNX model).
"""

from remat_bench.models.llama import common, linen, nnx
from remat_bench.models.llama.common import preset_names, presets, tag_names

__all__ = ["common", "linen", "nnx", "preset_names", "presets", "tag_names"]
