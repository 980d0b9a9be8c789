"""Argument helpers shared by the Flax adapters (``linen.py`` and ``nnx.py``)."""

from __future__ import annotations

import jax
import numpy as np

from remat._src import transform as transform_lib


def validate_passthrough(api: str, **options) -> None:
  """``remat.checkpoint``'s checks of the options an adapter passes on, naming ``api``."""
  try:
    transform_lib._validate_options(static_argnums=(), check_determinism=False, **options)
  except (TypeError, ValueError) as e:
    raise type(e)(str(e).replace("`remat.checkpoint`", api)) from None


def auto_static(x) -> bool:
  """Python flags (``None``, ``bool``, ``str``) are static without being listed."""
  return x is None or isinstance(x, (bool, str))


def has_array(x) -> bool:
  return any(isinstance(leaf, (jax.Array, np.ndarray, jax.core.Tracer))
             for leaf in jax.tree_util.tree_leaves(x))
