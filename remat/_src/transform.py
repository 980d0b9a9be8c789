"""``remat.checkpoint``: activation checkpointing as a ``jax.custom_vjp``.

The forward pass keeps only the inputs of the wrapped function (or, with a
policy, the intermediates the policy names); the backward pass recomputes the
rest under ``jax.vjp``. Two details make the saving real on every backend:

* the residuals *and the incoming cotangent* pass through one
  ``optimization_barrier`` before the recomputation, so the compiler cannot
  hoist the recomputation back into the forward pass (docs/facts.md, fact 2);
* closed-over traced values (``lambda x: f(params, x)`` under ``jax.grad``
  with respect to ``params``) are hoisted into explicit inputs with
  ``jax.closure_convert``, so they receive cotangents.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util as _source_info  # name stacks: see _fresh_name_stack

from remat._src import compile as compile_lib
from remat._src import offload as offload_lib
from remat._src import pytypes as rt
from remat._src.signature import positional_arity

_API = "`remat.checkpoint`"


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
    prevent_cse: bool = True,
    check_determinism: bool = False,
) -> rt.F:
  """Checkpoints ``fn``: keep its inputs, recompute its internals when differentiating.

  Under ``jax.grad`` (or ``jax.vjp``) a function wrapped by ``checkpoint``
  stores only its inputs for the backward pass; the backward pass runs the
  function again under ``jax.vjp`` and uses the recomputed intermediates. The
  result is numerically the same as without checkpointing; memory for the
  intermediates is traded for one more forward evaluation.

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
      a sequence of ints, ``policy`` is not callable, or at call time a static
      argument is not hashable.
    ValueError: if a static argument index is out of range for ``fn``.

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
  options = _validate_options(
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


def _validate_options(*, static_argnums, policy, offload, prevent_cse, check_determinism):
  nums = int_tuple(static_argnums)
  if nums is None:
    raise TypeError(
        f"the `static_argnums` argument to {_API} must be an int or a tuple of "
        f"ints, but got {static_argnums!r}. Pass the positions of the static "
        "positional arguments, e.g. `static_argnums=(1,)`.")
  if policy is not None and not callable(policy):
    raise TypeError(
        f"the `policy` argument to {_API} must be None or a callable "
        f"`(prim, *avals, **params) -> bool` such as "
        f"`jax.checkpoint_policies.dots_saveable`, but got {policy!r} of type "
        f"{type(policy).__name__}.")
  if offload is not None:
    offload_lib.validate_offload(offload, api=_API)
  if not isinstance(prevent_cse, bool):
    raise TypeError(f"the `prevent_cse` argument to {_API} must be a bool, but got {prevent_cse!r}.")
  if not isinstance(check_determinism, bool):
    raise TypeError(
        f"the `check_determinism` argument to {_API} must be a bool, but got "
        f"{check_determinism!r}.")
  return dict(static_argnums=nums, policy=policy, offload=offload,
              prevent_cse=prevent_cse, check_determinism=check_determinism)


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

  @functools.wraps(fn)
  def checkpointed(*args, **kwargs):
    compile_lib.check_cpu_barriers()  # warns once where XLA:CPU would undo the checkpoint
    nums = _normalize_static(static_argnums, len(args), fn)
    static = {i: args[i] for i in nums}
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
    origins = _leaf_origins(dyn_args, kwargs, [i for i in range(len(args)) if i not in static])

    def flat_fn(*flat):
      d_args, d_kwargs = jax.tree_util.tree_unflatten(in_tree, flat)
      it = iter(d_args)
      full = [static[i] if i in static else next(it) for i in range(len(args))]
      return fn(*full, **d_kwargs)

    converted, consts = jax.closure_convert(flat_fn, *leaves)
    converted = _fresh_name_stack(converted)
    call = _build_custom_vjp(converted, policy=policy, offload=offload,
                             prevent_cse=prevent_cse, check_determinism=check_determinism,
                             name=getattr(fn, "__name__", "fn"),
                             origins=origins + (None,) * len(consts))
    return call(*leaves, *consts)

  checkpointed.__wrapped__ = fn  # type: ignore[attr-defined]
  return checkpointed


def _normalize_static(static_argnums, nargs, fn):
  out = set()
  for i in static_argnums:
    j = i + nargs if i < 0 else i
    if not 0 <= j < nargs:
      raise ValueError(
          f"the `static_argnums` argument to {_API} is out of range: index {i} "
          f"for a call of {getattr(fn, '__name__', fn)!r} with {nargs} positional "
          "argument(s). Pass the static argument positionally, or fix the index.")
    out.add(j)
  return out


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


def _is_key(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def _barrier(tree):
  """``optimization_barrier`` over every leaf that it accepts (keys go via their data)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  plain_idx, plain = [], []
  for i, x in enumerate(leaves):
    if x is None or not hasattr(x, "dtype"):
      continue
    if x.dtype == jax.dtypes.float0:
      continue
    if _is_key(x):
      plain_idx.append(i)
      plain.append(("key", jax.random.key_impl(x), jax.random.key_data(x)))
    else:
      plain_idx.append(i)
      plain.append(("arr", None, x))
  datas = jax.lax.optimization_barrier([d for _, _, d in plain])
  leaves = list(leaves)
  for i, (kind, impl, _), d in zip(plain_idx, plain, datas, strict=True):
    leaves[i] = jax.random.wrap_key_data(d, impl=impl) if kind == "key" else d
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _same_bits(a, b) -> bool:
  """Bit-for-bit equality (NaN payloads and signed zeros included; any dtype, bf16 too)."""
  a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _check_outputs(name, out, again):
  leaves_a = [x for x in jax.tree_util.tree_leaves(out)]
  leaves_b = [x for x in jax.tree_util.tree_leaves(again)]
  leaves_a = [jax.random.key_data(x) if _is_key(x) else x for x in leaves_a]
  leaves_b = [jax.random.key_data(x) if _is_key(x) else x for x in leaves_b]

  def report(*flat):
    n = len(flat) // 2
    bad = [i for i in range(n) if not _same_bits(flat[i], flat[n + i])]
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
    with _source_info.reset_name_stack():
      return converted(*args)

  return run


def _build_custom_vjp(converted, *, policy, offload, prevent_cse, check_determinism, name,
                      origins=None):
  """A custom_vjp over flat inputs that recomputes ``converted`` in the backward pass."""

  @jax.custom_vjp
  def call(*flat):
    return converted(*flat)

  def fwd(*flat):
    if policy is None:
      out = converted(*flat)
      res = flat
    else:
      inner = jax.checkpoint(converted, policy=policy, prevent_cse=False)
      out, res = jax.vjp(inner, *flat)
    if check_determinism:
      again = converted(*_barrier(flat))
      _check_outputs(name, out, again)
    if offload is not None:
      res = offload.to_host(res, inputs=flat, origins=origins)
    return out, res

  def bwd(res, ct):
    if offload is not None:
      res = offload.to_device(res)
    if prevent_cse:
      res, ct = _barrier((res, ct))
    if policy is None:
      _, vjp_fn = jax.vjp(converted, *res)
    else:
      vjp_fn = res
    return tuple(vjp_fn(ct))

  call.defvjp(fwd, bwd)
  return call
