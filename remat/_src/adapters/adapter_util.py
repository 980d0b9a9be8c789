"""Argument helpers shared by the Flax adapters (``linen.py`` and ``nnx.py``)."""

from __future__ import annotations

import jax
import numpy as np

from remat._src.util import compat
from remat._src.core import transform as transform_lib

api_boundary = compat.api_boundary  # errors below an adapter's wrapper show the user's frames


def validate_passthrough(api: str, **options) -> None:
  """``remat.checkpoint``'s checks of the options an adapter passes on, naming ``api``."""
  prevent_cse = options.get("prevent_cse", True)
  if not isinstance(prevent_cse, bool):
    # Per-argument flags would count the adapter's own leading arguments (variables, RNG state).
    raise TypeError(
        f"the `prevent_cse` argument to {api} must be a bool, as for `nn.remat` and "
        f"`nnx.remat`, but got {prevent_cse!r}. Per-argument flags are an option of "
        "`remat.checkpoint` on a plain function.")
  transform_lib.validate_options(static_argnums=(), check_determinism=False, api=api, **options)


def check_flag(api: str, name: str, value) -> None:
  """A keyword option that must be a bool."""
  if not isinstance(value, bool):
    raise TypeError(f"the `{name}` argument to {api} must be a bool, but got {value!r}.")


def auto_static(x) -> bool:
  """Python flags (``None``, ``bool``, ``str``) are static without being listed."""
  return x is None or isinstance(x, (bool, str))


def has_array(x) -> bool:
  return any(isinstance(leaf, (jax.Array, np.ndarray, jax.core.Tracer))
             for leaf in jax.tree_util.tree_leaves(x))


def static_set(args, positions, *, api: str, name: str, counting: str = "", auto: bool,
               traced=has_array, what=None) -> set[int]:
  """The argument indices a call passes as static: those ``static_argnums`` names, plus Python
  flags when ``auto`` (:func:`auto_static`).

  Args:
    args: the call's positional arguments, as the checkpointed function receives them.
    positions: pairs ``(number the user wrote, index into args)``.
    api: our public name, for messages; name: the user's function; counting: how the user's
      numbers count (``" (counting `self` as 0)"``).
    traced: whether an argument holds traced state and cannot be static.
    what: describes an argument for the message (default :func:`describe`).

  Raises:
    TypeError: ``static_argnums`` names an argument that holds arrays (or other traced state).
  """
  static = set()
  for shown, j in positions:
    if traced(args[j]):
      raise TypeError(
          f"{api}: `static_argnums` includes position {shown} of `{name}`{counting}, but the argument "
          f"there is {(what or describe)(args[j])}. Static arguments must be hashable Python values; "
          "drop this index from `static_argnums` to pass it as traced state.")
    static.add(j)
  if auto:
    static |= {i for i, a in enumerate(args) if auto_static(a)}
  return static


def describe(x) -> str:
  """What an argument is, for messages: ``an array float32[4, 8]``, ``a pytree with 3 arrays``."""
  leaves = [leaf for leaf in jax.tree_util.tree_leaves(x) if hasattr(leaf, "shape")]
  if len(leaves) == 1:
    leaf = leaves[0]
    return f"an array {getattr(leaf.dtype, 'name', leaf.dtype)}{list(leaf.shape)}"
  return f"a pytree with {len(leaves)} arrays"
