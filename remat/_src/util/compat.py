"""The one place remat touches private or unstable jax and flax APIs.

Private modules move between minor versions. Each name here is looked up once,
at import: first where current releases keep it, then where other releases
kept it. Where it is found nowhere, remat keeps working with a public
replacement, or degrades and says so once with a :class:`CompatibilityWarning`
that names the installed versions. ``tests/test_compat.py`` hides each name and
checks the fallback.

Where each name lives (the same in jax 0.10.2, 0.11.2 and 0.12.0.1, flax 0.12.8 and
0.12.12), and what happens without it:

* ``reset_name_stack``: ``jax.extend.source_info_util`` (public), else
  ``jax._src.source_info_util``. Without it nested plans still compute the same
  values but lower more slowly (warned; docs/facts.md, fact 10).
* ``register_exclusion`` and ``api_boundary`` (``jax._src.traceback_util``):
  remat's frames left out of filtered tracebacks. Without them tracebacks show
  remat's frames too (no warning: nothing computes differently).
* ``trace_context`` (``jax._src.config``): part of every trace-cache key.
  Without it the key holds the public flags that change a trace (x64, matmul
  precision, rank promotion).
* ``trace_state_clean`` (``jax._src.core``): whether a call happens outside
  every jax trace, so that ``remat.jit`` may pass compiler options (jax allows
  them on top-level jits only). Without it ``remat.jit`` looks for traced
  arguments instead (a jit called on constants inside another trace then raises
  jax's error about nested compiler options).
* ``saved_residuals``: ``jax._src.ad_checkpoint``. Without it the same listing
  is read here from the jaxpr of ``jax.vjp`` (public API; no warning).
* A ``Lowered``'s compiler options and platform: ``Lowered._lowering``'s
  ``_compiler_options_kvs`` and ``_platforms``. Without them ``remat.profile``
  uses our options alone and the default backend.
* ``global_state.client`` (``jax._src.distributed``): the key-value store of a
  ``jax.distributed`` job, through which process 0 hands ``remat.fit``'s plans
  to the others. Without it every process searches on its own (each reads the
  plan cache first), and ``remat.fit`` warns once.
* ``resolve_kwargs``: ``flax.nnx.transforms.transforms``; else a copy here.
* ``update_context`` (``flax.nnx``, public; ``flax.nnx.graphlib``),
  ``split_inputs`` and ``merge_inputs`` (``flax.nnx.transforms.general``).
  Without them ``remat.nnx.checkpoint`` falls back to ``flax.nnx.remat``
  (warned; ``offload=`` raises).
* ``extract`` (``flax.nnx.extract``) and ``SimpleRematFn``
  (``flax.nnx.transforms.autodiff``): ``nnx.remat``'s tree mode. Without them
  ``remat.nnx.checkpoint(graph=False)`` raises ``NotImplementedError``.
* ``pack`` (``flax.core.lift``), ``lift_transform`` and
  ``decorator_lift_transform`` (``flax.linen.transforms``). Without them
  ``remat.linen.checkpoint`` falls back to ``flax.linen.remat`` (warned;
  ``offload=`` raises).
* ``scan`` and ``tree_map_rngs`` (``flax.core.lift``), ``Scope``
  (``flax.core.scope``), with ``pack`` and ``lift_transform``:
  ``remat.linen.scan``'s lifting. Without them ``remat.linen.scan`` raises
  ``NotImplementedError`` naming the versions and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import itertools
import warnings
from typing import Any, Callable

import jax


class CompatibilityWarning(UserWarning):
  """The installed jax or flax lacks an API remat uses; remat says what it does instead."""


def _version_tuple(version: str) -> tuple[int, ...]:
  """``"0.12.0.1"`` -> ``(0, 12, 0, 1)``; stops at the first part that is not a number (``dev``)."""
  out = []
  for part in version.split("."):
    digits = "".join(itertools.takewhile(str.isdigit, part))
    if not digits:
      break
    out.append(int(digits))
    if digits != part:
      break
  return tuple(out)


JAX_VERSION = _version_tuple(jax.__version__)

# XLA:CPU removes optimization barriers, undoing remat, unless `cse_barrier_expander` is disabled:
# measured on jax 0.10.2 and 0.11.0, not on 0.11.1, 0.11.2 or 0.12.0.1 (docs/facts.md, facts 1, 20).
CPU_UNDOES_REMAT = JAX_VERSION < (0, 11, 1)


def versions() -> str:
  """``"jax X, jaxlib Y, flax Z"`` for messages."""
  out = [f"jax {jax.__version__}"]
  for name in ("jaxlib", "flax"):
    try:
      out.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception:  # noqa: BLE001 - a version string must never break a message
      out.append(f"{name} (not importable)")
  return ", ".join(out)


def _find(*locations: tuple[str, str]) -> Any:
  """The first ``module.attribute`` of ``locations`` that imports, else None."""
  for module, attr in locations:
    try:
      found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
      continue
    if found is not None:
      return found
  return None


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
  """One :class:`CompatibilityWarning` per ``key`` and process."""
  if key in _warned:
    return
  _warned.add(key)
  warnings.warn(f"{message} (installed: {versions()})", CompatibilityWarning, stacklevel=3)


### jax: name stacks (docs/facts.md, fact 10)

_reset_name_stack = _find(("jax.extend.source_info_util", "reset_name_stack"),
                          ("jax._src.source_info_util", "reset_name_stack"))


def reset_name_stack():
  """A context that evaluates under an empty name stack; a no-op (warned once) without one."""
  if _reset_name_stack is None:
    warn_once("reset_name_stack",
              "remat could not find jax's `source_info_util.reset_name_stack` (looked in "
              "`jax.extend.source_info_util` and `jax._src.source_info_util`): nested checkpoints "
              "still compute the same values, but deep plans lower more slowly (name stacks double "
              "at every nesting level; docs/facts.md, fact 10)")
    return contextlib.nullcontext()
  return _reset_name_stack()


### jax: traceback filtering, trace-cache keys, backend state

_traceback_register_exclusion = _find(("jax._src.traceback_util", "register_exclusion"))
_traceback_api_boundary = _find(("jax._src.traceback_util", "api_boundary"))


def register_traceback_exclusion(path: str) -> None:
  """Leaves the frames under ``path`` out of jax's filtered tracebacks (a no-op without jax's)."""
  if _traceback_register_exclusion is not None:
    _traceback_register_exclusion(path)


def api_boundary(fun: Callable) -> Callable:
  """jax's ``api_boundary``: an error raised below ``fun`` gets a filtered traceback."""
  return fun if _traceback_api_boundary is None else _traceback_api_boundary(fun)


_trace_context = _find(("jax._src.config", "trace_context"))


def trace_context() -> Any:
  """jax's tracing context (x64, matmul precision, mesh, named axes), for trace-cache keys."""
  if _trace_context is not None:
    return _trace_context()
  # Keep caching correct for the public flags at least.
  return (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
          jax.config.jax_numpy_rank_promotion)


_trace_state_clean = _find(("jax._src.core", "trace_state_clean"))


def outside_traces(args: Any = ()) -> bool:
  """Whether code runs outside every jax transformation (``jit``, ``grad``, ``vmap`` ...).

  Without jax's own answer, ``args`` decide: no traced value among them.
  """
  if _trace_state_clean is not None:
    try:
      return bool(_trace_state_clean())
    except Exception:  # noqa: BLE001 - any change in jax's internals: fall back
      pass
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args))


### jax: residuals of a vjp

_saved_residuals = _find(("jax._src.ad_checkpoint", "saved_residuals"),
                         ("jax.ad_checkpoint", "saved_residuals"))


def saved_residuals(fn: Callable, *args, **kwargs) -> list[tuple[Any, str]]:
  """``(aval, source)`` of what ``jax.vjp(fn, ...)`` keeps, as jax's private helper lists them."""
  if _saved_residuals is not None:
    return _saved_residuals(fn, *args, **kwargs)
  return _saved_residuals_from_vjp(fn, *args, **kwargs)


def _saved_residuals_from_vjp(fn, *args, **kwargs):
  """The same listing from public API: the residual outputs of ``jax.vjp``'s jaxpr.

  Sources read ``from the argument at flattened index i``, ``from a constant``,
  ``named 'n'`` (``checkpoint_name``) or ``output of <primitive>``.
  """
  leaves, tree = jax.tree_util.tree_flatten((args, kwargs))

  def flat(*xs):
    a, k = jax.tree_util.tree_unflatten(tree, xs)
    return fn(*a, **k)

  closed, shapes = jax.make_jaxpr(lambda *xs: jax.vjp(flat, *xs), return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  n_res = jax.tree_util.tree_structure(shapes[1]).num_leaves
  outs = list(jaxpr.outvars[len(jaxpr.outvars) - n_res:])
  is_var = lambda v: not hasattr(v, "val")  # a Literal carries its value
  # As jax does: a saved name's `reduce_precision` is not the producer; look through it.
  through = {e.outvars[0]: e.invars[0] for e in jaxpr.eqns if e.primitive.name == "reduce_precision"}

  def producer(v):
    while v in through:
      v = through[v]
    return v

  wanted = {producer(v) for v in outs if is_var(v)}
  found = [(v.aval, "from a literal") for v in outs if not is_var(v)]
  found += [(v.aval, "from a constant") for v in jaxpr.constvars if v in wanted]
  found += [(v.aval, f"from the argument at flattened index {i}")
            for i, v in enumerate(jaxpr.invars) if v in wanted]
  for eqn in jaxpr.eqns:
    name = eqn.params.get("name") if eqn.primitive.name == "name" else getattr(
        eqn.params.get("_prim"), "name", None)  # checkpoint_name: `name` (0.10), a hi primitive (0.12)
    for v in eqn.outvars:
      if v in wanted:
        found.append((v.aval, f"named '{name}'" if isinstance(name, str)
                      else f"output of {eqn.primitive.name}"))
  return found


### jax: what a Lowered was lowered with


def lowered_compiler_options(lowered) -> dict[str, Any] | None:
  """The ``compiler_options`` a ``jax.stages.Lowered`` carries from ``jax.jit``, if readable."""
  kvs = getattr(getattr(lowered, "_lowering", None), "_compiler_options_kvs", None)
  try:
    return dict(kvs) if kvs else None
  except (TypeError, ValueError):
    return None


def lowered_platform(lowered) -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"``: the backend ``lowered`` was lowered for (default if unknown)."""
  platforms = getattr(getattr(lowered, "_lowering", None), "_platforms", None)
  try:
    platform = str(platforms[0]).lower()
  except (TypeError, IndexError, KeyError):
    return jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


### jax: the distributed key-value store (one plan per jax.distributed job)


def distributed_client() -> Any:
  """The ``jax.distributed`` client with ``key_value_set`` / ``blocking_key_value_get``, or None."""
  state = _find(("jax._src.distributed", "global_state"))
  client = getattr(state, "client", None)
  if client is None or not hasattr(client, "key_value_set") or not hasattr(client, "blocking_key_value_get"):
    return None
  return client


### flax.nnx: the graph-mode split/merge composition of `nnx.remat`


def _resolve_kwargs_copy(fun, args, kwargs) -> tuple:
  """``flax.nnx.transforms.transforms.resolve_kwargs`` (flax 0.12): keywords to positions."""
  if isinstance(fun, functools.partial):
    fun = lambda *args, **kwargs: None  # a partial's signature is opaque
  bound = inspect.signature(fun).bind(*args, **kwargs)
  bound.apply_defaults()
  if bound.kwargs:
    raise TypeError("keyword arguments could not be resolved to positions")
  return bound.args


resolve_kwargs = _find(("flax.nnx.transforms.transforms", "resolve_kwargs")) or _resolve_kwargs_copy
nnx_update_context = _find(("flax.nnx", "update_context"), ("flax.nnx.graphlib", "update_context"))
nnx_split_inputs = _find(("flax.nnx.transforms.general", "split_inputs"))
nnx_merge_inputs = _find(("flax.nnx.transforms.general", "merge_inputs"))
HAS_NNX_SPLIT_MERGE = None not in (nnx_update_context, nnx_split_inputs, nnx_merge_inputs)


# nnx.remat's tree mode (graph=False / graph_updates=False), reused by remat.nnx.checkpoint.
nnx_extract = _find(("flax.nnx", "extract"))
nnx_simple_remat_fn = _find(("flax.nnx.transforms.autodiff", "SimpleRematFn"))
HAS_NNX_TREE_MODE = nnx_simple_remat_fn is not None and all(
    hasattr(nnx_extract, a) for a in ("to_tree2", "from_tree2", "check_no_aliases", "apply_updates"))


def nnx_remat_fallback(f, static_argnums, *, policy, offload, prevent_cse):
  """``flax.nnx.remat`` in place of our composition, where flax lacks its parts."""
  missing = ("`flax.nnx.transforms.general.split_inputs`/`merge_inputs` or "
             "`flax.nnx.update_context`")
  if offload is not None:
    raise NotImplementedError(
        f"`remat.nnx.checkpoint(offload=...)` needs {missing}, which this flax lacks "
        f"({versions()}). Use `remat.checkpoint(..., offload=...)` on a function of arrays, "
        "or install a flax version listed in remat's README (Supported versions).")
  warn_once("nnx_split_merge",
            f"remat could not find {missing}: `remat.nnx.checkpoint` falls back to "
            "`flax.nnx.remat` (jax.checkpoint); values and gradients are the same, but the "
            "offload option is unavailable")
  from flax import nnx

  return nnx.remat(f, static_argnums=tuple(static_argnums), policy=policy, prevent_cse=prevent_cse)


### flax.linen: the lifting of `flax.core.lift.checkpoint`

lift_pack = _find(("flax.core.lift", "pack"))
lift_transform = _find(("flax.linen.transforms", "lift_transform"))
decorator_lift_transform = _find(("flax.linen.transforms", "decorator_lift_transform"))
HAS_LINEN_LIFT = None not in (lift_pack, lift_transform, decorator_lift_transform)


def linen_remat_fallback(target, *, static_argnums, policy, offload, prevent_cse, methods, variables,
                         rngs):
  """``flax.linen.remat`` in place of our lifted transform, where flax lacks its parts."""
  missing = ("`flax.core.lift.pack` or `flax.linen.transforms.lift_transform`/"
             "`decorator_lift_transform`")
  if offload is not None:
    raise NotImplementedError(
        f"`remat.linen.checkpoint(offload=...)` needs {missing}, which this flax lacks "
        f"({versions()}). Use `remat.checkpoint(..., offload=...)` on a function of arrays, "
        "or install a flax version listed in remat's README (Supported versions).")
  warn_once("linen_lift",
            f"remat could not find {missing}: `remat.linen.checkpoint` falls back to "
            "`flax.linen.remat` (jax.checkpoint); values and gradients are the same, but the "
            "offload option is unavailable and Python bool/str arguments must be listed in "
            "`static_argnums`")
  import flax.linen as nn

  kw = dict(static_argnums=tuple(static_argnums), policy=policy, prevent_cse=prevent_cse,
            variables=variables, rngs=rngs)
  if methods is not None:
    kw["methods"] = list(methods)
  return nn.remat(target, **kw)


### flax.linen: the lifting of `remat.linen.scan` (as `flax.core.lift.scan`)

lift_scan = _find(("flax.core.lift", "scan"))
lift_tree_map_rngs = _find(("flax.core.lift", "tree_map_rngs"))
core_scope = _find(("flax.core.scope", "Scope"), ("flax.core", "Scope"))
HAS_LINEN_SCAN = None not in (lift_pack, lift_transform, lift_scan, lift_tree_map_rngs, core_scope)


def require_linen_scan(api: str) -> None:
  """Raises ``NotImplementedError`` naming what ``api`` needs if this flax lacks it."""
  if not HAS_LINEN_SCAN:
    raise NotImplementedError(
        f"{api} needs `flax.core.lift.pack`/`scan`/`tree_map_rngs`, `flax.core.scope.Scope` and "
        f"`flax.linen.transforms.lift_transform`, which this flax lacks ({versions()}). Use "
        "`flax.linen.scan(remat.linen.checkpoint(Block), ...)` (every block checkpointed), or "
        "install a flax version listed in remat's README (Supported versions).")
