"""Compiler options that keep rematerialization alive, and ``remat.jit``."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

# XLA:CPU runs `cse_barrier_expander`, which deletes optimization barriers;
# CSE and scheduling then move the recomputation back into the forward pass
# and a checkpointed program uses as much memory as a plain one (docs/facts.md,
# fact 1). GPU and TPU keep their barriers.
_NEEDS_BARRIER_OPTION = {"cpu": {"xla_disable_hlo_passes": "cse_barrier_expander"}}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
  """The XLA compiler options that keep rematerialization on ``backend``.

  Args:
    backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` … ; default ``jax.default_backend()``.

  Returns:
    A new dict to pass as ``jax.jit(..., compiler_options=...)`` or
    ``lowered.compile(compiler_options)``; empty where none are needed.

  Example:

    >>> import remat
    >>> remat.compiler_options("cpu")
    {'xla_disable_hlo_passes': 'cse_barrier_expander'}
    >>> remat.compiler_options("tpu")
    {}
  """
  backend = backend or jax.default_backend()
  return dict(_NEEDS_BARRIER_OPTION.get(backend, {}))


def merge_compiler_options(user: dict[str, Any] | None, backend: str | None = None) -> dict[str, Any]:
  """Our options merged into ``user``'s (pass lists are joined, not replaced)."""
  merged = dict(user or {})
  for k, v in compiler_options(backend).items():
    if k == "xla_disable_hlo_passes" and merged.get(k):
      passes = [p for p in str(merged[k]).split(",") if p]
      if v not in passes:
        passes.append(v)
      merged[k] = ",".join(passes)
    else:
      merged.setdefault(k, v)
  return merged


def jit(fn: Callable | None = None, /, **jit_kwargs) -> Callable:
  """``jax.jit`` with the compiler options that keep rematerialization.

  On CPU this disables XLA's ``cse_barrier_expander`` pass, without which the
  CPU compiler silently undoes checkpointing; on other backends it adds
  nothing. Any ``compiler_options`` you pass are kept and merged.

  Args:
    fn: the function to compile. May be omitted to use as a decorator factory
      (``@remat.jit(donate_argnums=0)``).
    **jit_kwargs: any ``jax.jit`` keyword (``static_argnums``,
      ``donate_argnums``, ``in_shardings``, ``backend``, ``compiler_options`` …).

  Returns:
    The jitted function.

  Raises:
    TypeError: if ``fn`` is not callable.

  Example:

    >>> import jax.numpy as jnp, remat
    >>> f = remat.jit(lambda x: jnp.sin(x) * 2)
    >>> float(f(0.0))
    0.0
  """
  if fn is None:
    return functools.partial(jit, **jit_kwargs)
  if not callable(fn):
    raise TypeError(f"`remat.jit` expects a callable, but got {fn!r}.")
  backend = jit_kwargs.get("backend")
  jit_kwargs["compiler_options"] = merge_compiler_options(jit_kwargs.get("compiler_options"), backend)
  return jax.jit(fn, **jit_kwargs)
