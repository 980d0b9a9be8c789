"""Positional arity of a callable: the one place that inspects signatures."""

from __future__ import annotations

import inspect


def positional_arity(fn) -> int | None:
  """How many positional parameters ``fn`` takes; ``None`` if unbounded (``*args``) or unknown.

  Example:

    >>> from remat._src.signature import positional_arity
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
