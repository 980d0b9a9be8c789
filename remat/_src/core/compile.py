"""Compiler options that keep rematerialization alive, applied only to what remat compiles.

XLA:CPU removes optimization barriers and so undoes checkpointing: entirely
before jax 0.11.1, partly (nested plans) after (docs/facts.md, facts 1, 20). ``remat.jit``, ``remat.profile``,
``remat.fit`` and the planners' compiles pass the options that keep the
barriers, per compile (:func:`compiler_options`). Nothing is set for the
process: ``import remat`` changes no other program's compilation (fact 24 says
why a process-wide flag is unsafe). Under a plain ``jax.jit`` on such a jax, a
checkpoint saves no memory; the first one traced there warns once
(:func:`check_cpu_barriers`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from typing import Any, Callable

import jax

from remat._src.util import compat

# Passes XLA:CPU must skip for a checkpoint to save what theory says (docs/facts.md, facts 1, 20,
# 24). `cse_barrier_expander` deletes optimization barriers, after which CSE and scheduling move the
# recomputation back into the forward pass: up to jax 0.11.0 all of it; from 0.11.1 XLA:CPU keeps
# single checkpoints by itself, but nested plans still come out one activation larger (revolve(2)
# on 16 layers: 5 against 4). With the barriers kept, `small-while-loop-hoisting` must go too: it
# turns a while loop that touches under 1 KiB per iteration into one nested kernel, whose emitter
# cannot hold a barrier (the process aborts in `shape.h: Check failed: buffer != nullptr`, or
# compiling fails with "Unhandled opcode for elemental IR emission: opt-barrier"; jax 0.10.2 and
# 0.12.0.1 alike). Such loops then run as the thunk loops that larger ones are anyway.
_BARRIER_PASSES = ("cse_barrier_expander", "small-while-loop-hoisting")
_NEEDS_OPTIONS = {"cpu": {"xla_disable_hlo_passes": ",".join(_BARRIER_PASSES)}}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
  """The XLA compiler options that keep rematerialization on ``backend``.

  Args:
    backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` … ; default ``jax.default_backend()``.

  Returns:
    A new dict to pass as ``jax.jit(..., compiler_options=...)`` or
    ``lowered.compile(compiler_options)``; empty where none are needed (GPU,
    TPU).

  Example:

    >>> import remat
    >>> remat.compiler_options("cpu")
    {'xla_disable_hlo_passes': 'cse_barrier_expander,small-while-loop-hoisting'}
    >>> remat.compiler_options("tpu")
    {}
  """
  backend = backend or jax.default_backend()
  return dict(_NEEDS_OPTIONS.get(backend, {}))


# Programs compiled only to read their memory and flops (per-layer costs) need no optimised machine
# code: on XLA:CPU, LLVM's optimisation level changes neither `memory_analysis` (buffer assignment
# runs before code generation) nor `cost_analysis` (HLO) -- identical numbers for plain and
# checkpointed 8-block transformer steps -- and each compile takes about 30% less time.
_ANALYSIS_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def analysis_options(backend: str | None = None) -> dict[str, Any]:
  """Extra compiler options for programs that are measured, never run (see ``_ANALYSIS_OPTIONS``)."""
  return dict(_ANALYSIS_OPTIONS.get(backend or jax.default_backend(), {}))


def merge_compiler_options(user: dict[str, Any] | None, backend: str | None = None) -> dict[str, Any]:
  """Our options merged into ``user``'s (pass lists are joined, not replaced).

  Example:

    >>> from remat._src.core.compile import merge_compiler_options
    >>> merge_compiler_options({"xla_disable_hlo_passes": "foo"}, "tpu")
    {'xla_disable_hlo_passes': 'foo'}
  """
  merged = dict(user or {})
  for k, v in compiler_options(backend).items():
    if k == "xla_disable_hlo_passes" and merged.get(k):
      passes = [p for p in str(merged[k]).split(",") if p]
      passes += [p for p in v.split(",") if p not in passes]
      merged[k] = ",".join(passes)
    else:
      merged.setdefault(k, v)
  return merged


def jit(fn: Callable | None = None, /, **jit_kwargs) -> Callable:
  """``jax.jit`` with the compiler options that keep rematerialization.

  On CPU this disables XLA's ``cse_barrier_expander`` pass, without which the
  CPU compiler undoes checkpointing (all of it before jax 0.11.1, part of
  nested plans after), and its ``small-while-loop-hoisting`` pass, which
  cannot compile a kept barrier (docs/facts.md, fact 24); elsewhere it adds
  nothing. Any
  ``compiler_options`` you pass are kept and merged. Only what this function
  compiles is affected: other jits in the process are not.

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
  options = merge_compiler_options(jit_kwargs.get("compiler_options"), jit_kwargs.get("backend"))

  @functools.wraps(fn)
  def traced(*args, **kwargs):  # checkpoints traced here get the options: no warning for them
    with compiling_with_options():
      return fn(*args, **kwargs)

  top = jax.jit(traced, **{**jit_kwargs, "compiler_options": options})
  # Nested, only our options go: the user's own stay, as `jax.jit` would have them.
  nested = top if options == (jit_kwargs.get("compiler_options") or {}) else jax.jit(traced, **jit_kwargs)
  return _Jitted(fn, top, nested)


class _Jitted:
  """What ``remat.jit`` returns: ``jax.jit``'s object with the options, and without them for nested calls.

  ``lower``, ``trace``, ``eval_shape`` and every other attribute are the
  top-level jit's.
  """

  def __init__(self, fn: Callable, top: Callable, nested: Callable):
    self._top, self._nested = top, nested
    functools.update_wrapper(self, fn)

  def __call__(self, *args, **kwargs):
    if self._nested is self._top or compat.outside_traces((args, kwargs)):
      return self._top(*args, **kwargs)
    return self._nested(*args, **kwargs)

  def __getattr__(self, name: str):
    return getattr(self._top, name)


### The one warning under a plain jit (jax < 0.11.1 on CPU)


class CpuFlagsWarning(UserWarning):
  """A checkpoint was traced for a plain ``jax.jit`` on XLA:CPU that undoes it: use ``remat.jit``."""


_warned = {"cpu": False}
_with_options: contextvars.ContextVar[bool] = contextvars.ContextVar("remat_with_options", default=False)


@contextlib.contextmanager
def compiling_with_options():
  """Marks traces made for a compile that gets :func:`compiler_options` (no warning there)."""
  token = _with_options.set(True)
  try:
    yield
  finally:
    _with_options.reset(token)


def _user_disabled_barrier_pass() -> bool:
  """Whether the user's own ``XLA_FLAGS`` disable ``cse_barrier_expander`` (their choice, fact 24)."""
  lists = [t.split("=", 1)[1].split(",") for t in os.environ.get("XLA_FLAGS", "").split()
           if t.startswith("--xla_disable_hlo_passes=")]
  return bool(lists) and "cse_barrier_expander" in lists[-1]


def _staged(leaves) -> bool:
  """Whether the inputs are traced for a compile (``jit``, ``vmap``, ``scan``), not evaluated eagerly.

  Eager ``jax.grad`` and ``jax.jvp`` carry concrete values, and an eager
  checkpoint keeps only its inputs whatever XLA does: nothing to warn about.
  """
  for x in leaves:
    if isinstance(x, jax.core.Tracer):
      to_concrete = getattr(x, "to_concrete_value", None)
      if to_concrete is None or to_concrete() is None:
        return True
  return False


def check_cpu_barriers(leaves=()) -> None:
  """Warns once if a checkpoint is traced for a compile on CPU that will undo it.

  ``remat.checkpoint`` calls this when it is traced. It warns only where this
  jax's XLA:CPU undoes remat (before jax 0.11.1; docs/facts.md, fact 20), the
  default backend is CPU, the inputs are traced for a compile, the trace is
  not one of remat's own compiles (``remat.jit``, ``remat.profile``,
  ``remat.fit``), and the user's ``XLA_FLAGS`` do not keep the barriers.
  """
  if _warned["cpu"] or _with_options.get() or not compat.CPU_UNDOES_REMAT:
    return
  if not _staged(leaves) or _user_disabled_barrier_pass():
    return
  _warned["cpu"] = True
  if jax.default_backend() != "cpu":
    return
  warnings.warn(
      f"remat: on jax {jax.__version__}, XLA:CPU removes the optimization barriers of a checkpoint "
      "compiled by plain `jax.jit` (or `nnx.jit`, `nn.jit`), so the checkpoint saves no memory there "
      "(docs/facts.md, fact 1). Compile the step with `remat.jit` (same arguments as `jax.jit`) to "
      "keep the saving, or use jax >= 0.11.1, whose XLA:CPU keeps it by itself. Results are correct "
      "either way. remat sets no process-wide XLA flag: one would change how every other program "
      "compiles (docs/facts.md, fact 24).", CpuFlagsWarning, stacklevel=3)
