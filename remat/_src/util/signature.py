"""Signatures: the positional arity of a callable (the one place that inspects them), and the
positions a ``static_argnums`` names."""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np


def positional_arity(fn) -> int | None:
  """How many positional parameters ``fn`` takes; ``None`` if unbounded (``*args``) or unknown.

  Example:

    >>> from remat._src.util.signature import positional_arity
    >>> positional_arity(lambda p, x, key=None: x), positional_arity(lambda *a: a)
    (3, None)
  """
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  n = 0
  for p in sig.parameters.values():
    if p.kind == p.VAR_POSITIONAL:
      return None
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
      n += 1
  return n


def int_tuple(value) -> tuple[int, ...] | None:
  """``3`` or ``(1, 2)`` as a tuple of ints; ``None`` for anything else (bools, strings, floats)."""
  is_int = lambda i: isinstance(i, (int, np.integer)) and not isinstance(i, bool)  # noqa: E731
  if is_int(value):
    return (int(value),)
  if isinstance(value, (str, bytes)):
    return None
  try:
    nums = tuple(value)
  except TypeError:
    return None
  return tuple(int(i) for i in nums) if all(is_int(i) for i in nums) else None


def layer_callers(layers: Sequence[Callable]) -> list[Callable]:
  """``(p, x, key) -> y`` for every layer, whether it is ``layer(p, x)`` or ``layer(p, x, key)``."""
  out = []
  for f in layers:
    arity = positional_arity(f)
    out.append(f if arity is None or arity >= 3 else (lambda p, x, key, f=f: f(p, x)))
  return out


def static_argnums_of(value, *, api: str, example: str = "static_argnums=(1,)",
                      note: str = "") -> tuple[int, ...]:
  """``static_argnums`` as a tuple of ints, or the one ``TypeError`` every wrapper raises.

  Args:
    value: what the user passed.
    api: our API, named in the message.
    example: a correct call for this API.
    note: how this API counts positions (``"counting `self` as 0"``), if it says.
  """
  nums = int_tuple(value)
  if nums is None:
    how = f" ({note})" if note else ""
    raise TypeError(
        f"the `static_argnums` argument to {api} must be an int or a tuple of ints{how}, but got "
        f"{value!r}. Pass the positions of the static positional arguments, e.g. `{example}`.")
  return nums


def static_positions(nums: Sequence[int], nargs: int, fn_name: str, *, api: str) -> list[int]:
  """The positions ``static_argnums`` names in a call with ``nargs`` positional arguments
  (negative ones counted from the end), or the one out-of-range ``ValueError``."""
  out = []
  for i in nums:
    j = i + nargs if i < 0 else i
    if not 0 <= j < nargs:
      raise ValueError(
          f"the `static_argnums` argument to {api} is out of range: index {i} for a call of "
          f"`{fn_name}` with {nargs} positional argument(s). Pass the static argument positionally, "
          "or fix the index.")
    out.append(j)
  return out
