"""Compiler options that keep rematerialization alive: ``remat.jit``, and ``XLA_FLAGS`` for every jit.

XLA:CPU removes optimization barriers and so undoes checkpointing (docs/facts.md,
fact 1). Two ways keep them: per compile (``remat.jit``, ``remat.profile``,
``remat.compiler_options()``), or for the whole process through ``XLA_FLAGS``,
which XLA reads when jax starts its CPU backend (fact 14). ``import remat``
does the latter when it still can (:func:`install_xla_flags`), so plain
``jax.jit``, ``nnx.jit`` and flax training loops keep the savings too; when
the backend had already started, the first checkpoint traced on CPU warns once
(:func:`check_cpu_barriers`). ``REMAT_NO_XLA_FLAGS=1`` opts out.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from typing import Any, Callable

import jax

from remat._src import compat

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

  @functools.wraps(fn)
  def traced(*args, **kwargs):  # checkpoints traced here get the options: no warning for them
    with _compiling_with_options():
      return fn(*args, **kwargs)

  return jax.jit(traced, **jit_kwargs)


### XLA_FLAGS for every jit on CPU (docs/facts.md, fact 14)

OPT_OUT_ENV = "REMAT_NO_XLA_FLAGS"
_BARRIER_PASS = "cse_barrier_expander"
_DISABLE = "--xla_disable_hlo_passes="


class CpuFlagsWarning(UserWarning):
  """jax's CPU backend started before ``import remat``: under plain ``jax.jit`` a checkpoint saves nothing."""


# What `import remat` did to XLA_FLAGS (see `install_xla_flags`), and whether a
# checkpoint traced on CPU should warn (once).
_state = {"xla_flags": "not yet", "warn": False}
_with_options: contextvars.ContextVar[bool] = contextvars.ContextVar("remat_with_options", default=False)


def flags_with_barrier_pass(flags: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with ``cse_barrier_expander`` added to the disabled passes.

  The user's flags are kept; an existing ``--xla_disable_hlo_passes`` list
  (the last one, which XLA uses) is extended rather than replaced.

  Example:

    >>> from remat._src.compile import flags_with_barrier_pass
    >>> flags_with_barrier_pass("--xla_force_host_platform_device_count=8")
    '--xla_force_host_platform_device_count=8 --xla_disable_hlo_passes=cse_barrier_expander'
    >>> flags_with_barrier_pass("--xla_disable_hlo_passes=foo,bar")
    '--xla_disable_hlo_passes=foo,bar,cse_barrier_expander'
  """
  tokens = flags.split()
  at = [i for i, t in enumerate(tokens) if t.startswith(_DISABLE)]
  if at:
    passes = [p for p in tokens[at[-1]][len(_DISABLE):].split(",") if p]
    if _BARRIER_PASS not in passes:
      tokens[at[-1]] = _DISABLE + ",".join(passes + [_BARRIER_PASS])
  else:
    tokens.append(_DISABLE + _BARRIER_PASS)
  return " ".join(tokens)


def _barrier_pass_disabled(flags: str) -> bool:
  lists = [t[len(_DISABLE):].split(",") for t in flags.split() if t.startswith(_DISABLE)]
  return bool(lists) and _BARRIER_PASS in lists[-1]


def install_xla_flags(environ=None) -> str:
  """Makes every jit on CPU keep checkpoints, if not too late (``import remat`` runs this).

  Adds ``--xla_disable_hlo_passes=cse_barrier_expander`` to ``XLA_FLAGS``
  (merged with the flags already there) unless jax's CPU backend has started
  (it reads ``XLA_FLAGS`` once, when it starts) or ``REMAT_NO_XLA_FLAGS`` is set
  to a non-empty value other than ``0``.

  Args:
    environ: the environment to change (default ``os.environ``).

  Returns:
    What happened: ``"added"``, ``"present"`` (the flag was already there),
    ``"opted out"`` or ``"too late"`` (the backend had started: the first
    checkpoint traced on CPU warns).
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    outcome = "opted out"
  elif _barrier_pass_disabled(flags):
    outcome = "present"
  elif compat.backends_started():
    outcome = "too late"
  else:
    environ["XLA_FLAGS"] = flags_with_barrier_pass(flags)
    outcome = "added"
  _state["xla_flags"] = outcome
  _state["warn"] = outcome == "too late"
  return outcome


@contextlib.contextmanager
def _compiling_with_options():
  token = _with_options.set(True)
  try:
    yield
  finally:
    _with_options.reset(token)


def check_cpu_barriers() -> None:
  """Warns once if a checkpoint is traced on CPU where plain ``jax.jit`` would undo it.

  ``remat.checkpoint`` calls this when it is traced. It warns only when
  ``import remat`` came after jax's CPU backend started (so ``XLA_FLAGS`` could
  not be set), the default backend is CPU, the trace is not inside
  ``remat.jit`` (which passes the option per compile), and this jax's XLA:CPU
  undoes remat at all (up to jax 0.11.0; from 0.11.1 it keeps the barriers:
  docs/facts.md, fact 20).
  """
  if not _state["warn"] or _with_options.get() or not compat.CPU_UNDOES_REMAT:
    return
  if jax.default_backend() != "cpu":
    _state["warn"] = False
    return
  _state["warn"] = False
  warnings.warn(
      "remat: jax's CPU backend started before `import remat`, so XLA:CPU will remove the "
      "optimization barriers of `remat.checkpoint` and checkpoints save no memory under plain "
      "`jax.jit`, `nnx.jit` or a flax training loop (docs/facts.md, fact 1). Fix: `import remat` "
      "before anything that runs jax code, or start Python with "
      "XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander; `remat.jit` and `remat.profile` "
      "keep the savings either way.", CpuFlagsWarning, stacklevel=3)
