"""``remat.checkpoint``: activation checkpointing with a custom backward pass.

The forward pass keeps only the inputs of the wrapped function (or, with a
policy, the intermediates the policy names); the backward pass recomputes the
rest under ``jax.vjp``. Three details make it work everywhere:

* the residuals *and the incoming cotangent* pass through one
  ``optimization_barrier`` before the recomputation, so the compiler cannot
  hoist the recomputation back into the forward pass (docs/facts.md, fact 2);
* closed-over traced values (``lambda x: f(params, x)`` under ``jax.grad``
  with respect to ``params``) are hoisted into explicit inputs, so they
  receive cotangents;
* the forward/backward pair is what a ``jax.custom_vjp`` would hold, but it is
  installed as a ``jax.custom_jvp`` whose tangent is one linear equation
  (``remat/_src/core/tangent.py``): transposed it is the backward pass above,
  evaluated it is the forward-mode derivative, so ``jax.jvp``,
  ``jax.linearize`` and ``jax.jacfwd`` work as with ``jax.checkpoint``.

Each wrapper caches its traces by input avals, static arguments and jax's
tracing context, as ``jax.checkpoint`` does, so eager calls trace once.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util as jex_source_info

from remat._src.core import barrier as barrier_lib
from remat._src.util import compat  # name stacks: see _fresh_name_stack
from remat._src.core import compile as compile_lib
from remat._src.core import offload as offload_lib
from remat._src.util import pytypes as rt
from remat._src.util import specs
from remat._src.core import tangent as tangent_lib
from remat._src.util.signature import positional_arity, static_argnums_of, static_positions

_API = "`remat.checkpoint`"


# remat's own frames (everything under remat/_src) are left out of filtered tracebacks and of
# the user frame recorded in jaxprs, as jax and flax leave out theirs; a function wrapped in
# `compat.api_boundary` filters the traceback of an error raised below it.
_SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # remat/_src
compat.register_traceback_exclusion(_SRC)
jex_source_info.register_exclusion(_SRC)


class RecomputationMismatchError(RuntimeError):
  """Raised by ``check_determinism=True`` when recomputing a checkpointed
  function does not reproduce its forward outputs bit for bit."""


### Main API


def checkpoint(
    fn: rt.F | None = None,
    *,
    static_argnums: int | Sequence[int] = (),
    policy: Callable[..., bool] | None = None,
    offload: Any = None,
    prevent_cse: bool | Sequence[Any] = True,
    check_determinism: bool = False,
) -> rt.F:
  """Checkpoints ``fn``: keep its inputs, recompute its internals when differentiating.

  Under ``jax.grad`` (or ``jax.vjp``) a function wrapped by ``checkpoint``
  stores only its inputs for the backward pass; the backward pass runs the
  function again under ``jax.vjp`` and uses the recomputed intermediates. The
  result is numerically the same as without checkpointing; memory for the
  intermediates is traded for one more forward evaluation. Forward mode
  (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``) works as with
  ``jax.checkpoint``, also through ``jit``, ``scan`` and ``while_loop``.

  Each call with new input shapes/dtypes or static values traces ``fn`` once;
  later calls reuse the trace (values ``fn`` closes over are read then, as in
  ``jax.checkpoint``; closed-over tracers are never kept).

  Randomness must come in through PRNG-key arguments (see ``remat.rng``): the
  recomputation then sees the same keys and draws the same dropout masks.

  On XLA:CPU, compile with ``remat.jit`` (or pass
  ``remat.compiler_options()``), otherwise the CPU compiler removes the
  barriers and undoes the saving.

  Args:
    fn: the function to checkpoint. Its inputs and outputs are pytrees of
      arrays, Python scalars, ``None``, integer/boolean arrays and PRNG keys
      (the non-float ones receive no gradient). May close over traced values.
    static_argnums: positional arguments that are static Python values
      (hashable), as in ``jax.checkpoint``.
    policy: an optional ``jax.checkpoint_policies`` policy (a callable
      ``(primitive, *avals, **params) -> bool``). Intermediates it marks as
      saveable are kept from the forward pass; the rest are recomputed
      (selective recomputation). ``None`` keeps only the inputs.
    offload: an optional ``remat.offload`` policy: the activations kept for
      the backward pass are placed in host memory (``pinned_host``) during the
      forward pass and brought back for the backward pass. Those are the
      dynamic arguments the policy selects (``remat.offload.host(argnums=1)``
      for ``block(params, x)``; by default every dynamic argument) and, with
      ``policy=``, the intermediates it saves; closed-over values never move.
    prevent_cse: put the residuals and the cotangent through one
      ``optimization_barrier`` before recomputing (keep ``True`` unless the
      call sits in a ``lax.scan`` body on a backend that does not need it).
      As in ``jax.checkpoint``, a tuple gives one bool (or pytree of bools)
      per dynamic positional argument (static ones are not counted): inputs
      marked ``False``, and closed-over values, stay out of the barrier; the
      cotangent always goes through.
    check_determinism: debugging aid. When differentiated, the forward pass
      runs ``fn`` a second time and raises :class:`RecomputationMismatchError`
      if the outputs differ bit for bit (for example randomness that does not
      come from key arguments). Under ``jit`` the check runs in a host
      callback, so the error reaches you as a runtime error carrying the same
      message. Doubles the forward cost; off by default.

  Returns:
    A function with the same signature, name and docstring as ``fn``.

  Raises:
    TypeError: if ``fn`` is not callable, ``static_argnums`` is not an int or
      a sequence of ints, ``policy`` is not callable, ``prevent_cse`` is
      neither a bool nor a tuple of bools, or at call time a static argument
      is not hashable.
    ValueError: if a static argument index is out of range for ``fn``, or a
      ``prevent_cse`` tuple does not match the arguments of a call.

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> @remat.checkpoint
    ... def block(w, x):
    ...   return jnp.tanh(jnp.tanh(x @ w) @ w)
    >>> w, x = jnp.eye(3), jnp.ones((2, 3))
    >>> g = jax.grad(lambda w: block(w, x).sum())(w)
    >>> bool(jnp.allclose(g, jax.grad(lambda w: jax.checkpoint(block.__wrapped__)(w, x).sum())(w)))
    True
  """
  options = validate_options(
      static_argnums=static_argnums,
      policy=policy,
      offload=offload,
      prevent_cse=prevent_cse,
      check_determinism=check_determinism,
  )
  if fn is None:
    return functools.partial(_make_checkpointed, **options)  # type: ignore[return-value]
  return _make_checkpointed(fn, **options)


### Implementation


def validate_options(*, static_argnums, policy, offload, prevent_cse, check_determinism, api: str = _API):
  """``remat.checkpoint``'s options, checked; errors name ``api`` (an adapter passes its own)."""
  nums = static_argnums_of(static_argnums, api=api)
  if policy is not None and not callable(policy):
    raise TypeError(
        f"the `policy` argument to {api} must be None or a callable "
        f"`(prim, *avals, **params) -> bool` such as "
        f"`jax.checkpoint_policies.dots_saveable`, but got {policy!r} of type "
        f"{type(policy).__name__}.")
  if offload is not None:
    offload_lib.validate_offload(offload, api=api)
  prevent_cse = _check_prevent_cse(prevent_cse, api)
  if not isinstance(check_determinism, bool):
    raise TypeError(
        f"the `check_determinism` argument to {api} must be a bool, but got "
        f"{check_determinism!r}.")
  return dict(static_argnums=nums, policy=policy, offload=offload,
              prevent_cse=prevent_cse, check_determinism=check_determinism)


def _check_prevent_cse(prevent_cse, api: str = _API) -> bool | tuple:
  """``True``/``False``, or a tuple of pytrees of bools (one entry per dynamic positional argument)."""
  if isinstance(prevent_cse, bool):
    return prevent_cse
  if isinstance(prevent_cse, (list, tuple)):
    flags = jax.tree_util.tree_leaves(prevent_cse)
    if all(isinstance(f, (bool, np.bool_)) for f in flags):
      return tuple(jax.tree_util.tree_map(bool, tuple(prevent_cse)))
  raise TypeError(
      f"the `prevent_cse` argument to {api} must be a bool, or a tuple with one bool (or pytree "
      f"of bools) per dynamic positional argument as in `jax.checkpoint`, but got "
      f"{prevent_cse!r}. For `f(x, w)` use e.g. `prevent_cse=(False, True)` to leave `x` out "
      "of the barrier.")


def _cse_flags(prevent_cse, dyn_args, kwargs, num_leaves, num_consts, fn) -> tuple[bool, ...] | None:
  """One flag per flat input leaf (then per hoisted constant): which go through the barrier.

  ``None`` means no barrier at all (``prevent_cse=False``). A tuple is matched
  as ``jax.checkpoint`` matches it: as a pytree prefix of the dynamic
  positional arguments (of ``(args, kwargs)`` when there are keyword
  arguments); closed-over values are left out of the barrier.
  """
  if prevent_cse is False:
    return None
  if prevent_cse is True:
    return (True,) * (num_leaves + num_consts)
  target = (tuple(dyn_args), kwargs) if kwargs else tuple(dyn_args)
  try:
    full = jax.tree.broadcast(prevent_cse, target)
  except ValueError as e:
    raise ValueError(
        f"the `prevent_cse` argument to {_API} must be a pytree prefix of the dynamic "
        f"positional arguments of {getattr(fn, '__name__', fn)!r} (static arguments are not "
        f"counted, as in `jax.checkpoint`), but got {prevent_cse!r} for a call with "
        f"{len(dyn_args)} dynamic positional argument(s)"
        f"{' and keyword arguments ' + repr(sorted(kwargs)) if kwargs else ''}. "
        f"Give one bool per argument. ({e})") from None
  flags = tuple(jax.tree_util.tree_leaves(full))
  assert len(flags) == num_leaves, (flags, num_leaves)
  return flags + (False,) * num_consts


_CACHE_SIZE = 128  # traces kept per checkpointed function (input shapes, static values)


def _make_checkpointed(fn, *, static_argnums, policy, offload, prevent_cse, check_determinism):
  if not callable(fn):
    raise TypeError(
        f"{_API} expects a callable to wrap, but got {fn!r} of type "
        f"{type(fn).__name__}. Use it as `@remat.checkpoint` on a function or "
        "`remat.checkpoint(f, ...)` with a function `f`.")
  arity = positional_arity(fn)
  if arity is not None:
    bad = [i for i in static_argnums if not -arity <= i < arity]
    if bad:
      raise ValueError(
          f"the `static_argnums` argument to {_API} is out of range: got "
          f"{static_argnums!r}, but {getattr(fn, '__name__', fn)!r} takes "
          f"{arity} positional argument(s). Use indices in [{-arity}, {arity}).")
  options = dict(policy=policy, offload=offload, check_determinism=check_determinism)
  cache: collections.OrderedDict[Any, _Traced] = collections.OrderedDict()

  @functools.wraps(fn)
  def checkpointed(*args, **kwargs):
    nums = set(static_positions(static_argnums, len(args), getattr(fn, '__name__', repr(fn)), api=_API))
    static = {i: args[i] for i in sorted(nums)}
    for i, v in static.items():
      try:
        hash(v)
      except TypeError as e:
        raise TypeError(
            f"{_API}: the static argument {i} of {getattr(fn, '__name__', fn)!r} "
            f"must be hashable, but got {v!r} of type {type(v).__name__} ({e}). "
            "Pass arrays as dynamic arguments (drop the index from "
            "`static_argnums`), or pass a hashable value such as a tuple.") from None
    dyn_args = tuple(a for i, a in enumerate(args) if i not in static)
    leaves, in_tree = jax.tree_util.tree_flatten((dyn_args, kwargs))
    leaves = [_as_array(x) for x in leaves]
    compile_lib.check_cpu_barriers(leaves)  # warns once where XLA:CPU would undo the checkpoint
    key = (len(args), tuple((i, type(v), v) for i, v in static.items()), in_tree,
           tuple(jax.typeof(x) for x in leaves), compat.trace_context())
    traced = cache.get(key)
    if traced is not None:
      cache.move_to_end(key)
      return traced(leaves, ())
    converted, out_tree, forwarded, consts = _trace(fn, static, len(args), in_tree, leaves)
    traced = _Traced(
        converted, out_tree, forwarded, name=getattr(fn, "__name__", "fn"),
        cse=_cse_flags(prevent_cse, dyn_args, kwargs, len(leaves), len(consts), fn),
        origins=(_leaf_origins(dyn_args, kwargs, [i for i in range(len(args)) if i not in static])
                 + (None,) * len(consts)), **options)
    if not consts:  # closed-over tracers belong to one trace: never keep them
      cache[key] = traced
      if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return traced(leaves, consts)

  checkpointed = compat.api_boundary(checkpointed)  # errors show the user's frames, not ours
  checkpointed.__wrapped__ = fn  # type: ignore[attr-defined]
  return checkpointed


def _trace(fn, static, nargs, in_tree, leaves) -> tuple[Callable, Any, list[int | None], list[Any]]:
  """Traces ``fn`` once for these input types: the flat function, the output tree, where each
  output comes from (an input position, or ``None``: computed) and the closed-over tracers.

  Closed-over tracers (``lambda x: f(params, x)`` with traced ``params``)
  become extra inputs, so that they are differentiated; closed-over concrete
  arrays stay constants of the trace, as in ``jax.checkpoint``.
  """

  def flat_fn(*flat):
    d_args, d_kwargs = jax.tree_util.tree_unflatten(in_tree, flat)
    it = iter(d_args)
    full = [static[i] if i in static else next(it) for i in range(nargs)]
    return fn(*full, **d_kwargs)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves)
  out_tree = jax.tree_util.tree_structure(out_shape)
  jaxpr = closed.jaxpr
  is_tracer = [isinstance(c, jax.core.Tracer) for c in closed.consts]
  consts = [c for c, t in zip(closed.consts, is_tracer, strict=True) if t]
  kept = [c for c, t in zip(closed.consts, is_tracer, strict=True) if not t]
  hoisted_vars = [v for v, t in zip(jaxpr.constvars, is_tracer, strict=True) if t]
  kept_vars = [v for v, t in zip(jaxpr.constvars, is_tracer, strict=True) if not t]
  # Outputs that are inputs, unchanged, are handed back as they are: as outputs of the
  # checkpoint they would each get a cotangent (a zero array kept alive by the barrier).
  position = {v: i for i, v in enumerate([*jaxpr.invars, *hoisted_vars])}
  forwarded = [position.get(v) if not isinstance(v, jex_core.Literal) else None for v in jaxpr.outvars]
  jaxpr = jaxpr.replace(constvars=kept_vars, invars=[*jaxpr.invars, *hoisted_vars],
                        outvars=[v for v, j in zip(jaxpr.outvars, forwarded, strict=True) if j is None])

  converted = _fresh_name_stack(lambda *flat: jax.core.eval_jaxpr(jaxpr, kept, *flat))
  return converted, out_tree, forwarded, consts


class _Traced:
  """One trace of a checkpointed function: call it with the flat inputs and hoisted constants."""

  def __init__(self, converted, out_tree, forwarded, *, name, cse: tuple[bool, ...] | None,
               origins: tuple[int | str | None, ...], policy, offload, check_determinism):
    self.converted = converted
    self.out_tree = out_tree
    self.forwarded = forwarded
    self.name = name
    self.cse = cse
    self.origins = origins
    self.options = dict(policy=policy, offload=offload, check_determinism=check_determinism)
    self._call = None  # built on the first call

  def __call__(self, leaves, consts):
    if self._call is None:
      self._call = _build_call(self.converted, prevent_cse=self.cse, name=self.name,
                               origins=self.origins, **self.options)
    flat = [*leaves, *consts]
    outs = iter(self._call(*flat) if any(j is None for j in self.forwarded) else ())
    out = [flat[j] if j is not None else next(outs) for j in self.forwarded]
    return jax.tree_util.tree_unflatten(self.out_tree, out)


def _leaf_origins(dyn_args, kwargs, positions) -> tuple[int | str, ...]:
  """Where each flat input leaf comes from: its positional index in the call, or its keyword.

  Closed-over values (appended by ``closure_convert``) get ``None``; the offload
  hook uses this to move activations but not parameters.
  """
  out: list[int | str] = []
  for j, a in enumerate(dyn_args):
    out.extend([positions[j]] * len(jax.tree_util.tree_leaves(a)))
  for k in sorted(kwargs):  # dicts flatten in sorted key order
    out.extend([k] * len(jax.tree_util.tree_leaves(kwargs[k])))
  return tuple(out)


def _as_array(x):
  if isinstance(x, (bool, int, float, complex, np.generic, np.ndarray)):
    return jnp.asarray(x)
  return x


def same_bits(a, b) -> bool:
  """Bit-for-bit equality (NaN payloads and signed zeros included; any dtype, bf16 too)."""
  a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _check_outputs(name, out, again):
  leaves_a = [x for x in jax.tree_util.tree_leaves(out)]
  leaves_b = [x for x in jax.tree_util.tree_leaves(again)]
  leaves_a = [jax.random.key_data(x) if specs.is_key(x) else x for x in leaves_a]
  leaves_b = [jax.random.key_data(x) if specs.is_key(x) else x for x in leaves_b]

  def report(*flat):
    n = len(flat) // 2
    bad = [i for i in range(n) if not same_bits(flat[i], flat[n + i])]
    if bad:
      raise RecomputationMismatchError(
          f"{_API}(check_determinism=True): recomputing {name!r} did not reproduce "
          f"its forward outputs (output leaves {bad} differ). The function draws "
          "randomness or state that is not passed in as an argument; pass PRNG keys "
          "explicitly (see `remat.rng`) so that the backward pass recomputes the "
          "same values.")

  if any(isinstance(x, jax.core.Tracer) for x in leaves_a + leaves_b):
    jax.debug.callback(report, *leaves_a, *leaves_b)
  else:
    report(*leaves_a, *leaves_b)


def _fresh_name_stack(converted):
  """Evaluates the closure-converted jaxpr under an empty name stack.

  ``jax.closure_convert`` re-evaluates a jaxpr, and evaluation prefixes each
  equation's recorded name stack with the current one. Nested checkpoints
  (a plan nests them as deep as the chain is long) re-evaluate jaxprs inside
  jaxprs, so without a reset the stacks double at every level and lowering
  time grows as 2**depth (measured: 0.5 s, 3.4 s, 15 s at nesting 14, 16, 17).
  """

  @functools.wraps(converted)
  def run(*args):
    with compat.reset_name_stack():
      return converted(*args)

  return run


def _build_call(converted, *, policy, offload, prevent_cse, check_determinism, name, origins=None):
  """``converted`` over flat inputs, recomputed in the backward pass.

  The forward rule ``fwd`` and the backward rule ``bwd`` are a custom_vjp's;
  they are installed as a ``jax.custom_jvp`` whose output tangent is one
  ``remat_tangent`` equation (``tangent.py``): transposing it runs ``bwd``,
  evaluating it runs ``jax.jvp`` from the residuals. ``prevent_cse`` is
  ``None`` (no barrier) or one flag per flat input.
  """

  def fwd(flat):
    if policy is None:
      out = converted(*flat)
      res = list(flat)
    else:
      inner = jax.checkpoint(converted, policy=policy, prevent_cse=False)
      out, res = jax.vjp(inner, *flat)
    if check_determinism:
      again = converted(*barrier_lib.barrier(flat))
      _check_outputs(name, out, again)
    res_leaves = jax.tree_util.tree_leaves(res)
    if prevent_cse is None:
      cse = None
    else:  # an input kept as a residual keeps its flag; a value the policy saved goes through
      flag = {id(x): f for x, f in zip(flat, prevent_cse, strict=True)}
      cse = tuple(flag.get(id(r), True) for r in res_leaves)
    if offload is not None:
      res = offload.to_host(res, inputs=flat, origins=origins)
    return out, res, cse

  def bwd(res, ct, cse):
    if offload is not None:
      res = offload.to_device(res)
    if cse is not None:
      res, ct = _barrier_some(res, cse, ct)
    if policy is None:
      _, vjp_fn = jax.vjp(converted, *res)
    else:
      vjp_fn = res
    return list(vjp_fn(ct))

  def jvp_from_residuals(res, in_tangents, out_avals):
    """The output tangents, computed from the residuals alone (forward mode)."""
    if offload is not None:
      res = offload.to_device(res)
    if policy is None:
      return tangent_lib.jvp_tangents(converted, res, in_tangents)
    # The residuals of a policy are a backward pass: its transpose is the forward map.
    lin = jax.linear_transpose(lambda *ct: list(res(list(ct))), *out_avals)
    return lin(list(in_tangents))

  return tangent_lib.custom_jvp_of(converted, fwd, bwd, jvp_from_residuals, name=name)


def _barrier_some(res, flags, ct):
  """``optimization_barrier`` over the cotangent and the residual leaves whose flag is set."""
  leaves, treedef = jax.tree_util.tree_flatten(res)
  picked = [x for x, f in zip(leaves, flags, strict=True) if f]
  picked, ct = barrier_lib.barrier((picked, ct))
  it = iter(picked)
  leaves = [next(it) if f else x for x, f in zip(leaves, flags, strict=True)]
  return jax.tree_util.tree_unflatten(treedef, leaves), ct
