"""``remat.linen.checkpoint``: ``flax.linen.remat`` built on ``remat.checkpoint``.

Flax lifts a JAX transform over a module in two layers (``flax/core/lift.py``
and ``flax/linen/transforms.py``): ``lift.pack`` turns the module's variable
collections and its PRNG streams into explicit arguments of a pure function
that returns its output and the repacked (mutated) collections, and
``lift_transform`` turns a function-of-scopes transform into a Module-class
transform. ``flax.linen.remat`` puts ``jax.checkpoint`` in the middle; we put
``remat.checkpoint`` (whose custom backward pass recomputes behind an
``optimization_barrier`` that includes the cotangent). Because the RNG keys
and the variables are arguments, the recomputation sees the same keys (same
dropout masks) and the collections are updated once, from the forward pass.
The keys pass through one ``optimization_barrier`` with the method's array
arguments before the checkpoint, so XLA cannot generate every block's dropout
bits at the start of the step (docs/facts.md, fact 11).

Differences from ``flax.linen.remat``, all on purpose:

* the returned class keeps the original class name, so auto-named submodules
  (``Block_0`` …) get the same names, and weights trained without
  checkpointing load unchanged even without an explicit ``name``;
* Python ``bool``, ``str`` and ``None`` arguments are static automatically
  (a ``train``/``deterministic`` flag needs no ``static_argnums``);
* bad arguments raise errors that say what to change (in types that are also
  flax's: a bad target raises a ``flax.errors.TransformTargetError``).

The core transform knows nothing of Flax; all Flax code is here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import jax
from flax import errors as flax_errors
from flax import linen as nn

from remat._src.adapters import adapter_util
from remat._src.core import barrier as barrier_lib
from remat._src.util import compat
from remat._src.util.signature import positional_arity, static_argnums_of
from remat._src.core import transform as transform_lib

_API = "`remat.linen.checkpoint`"


class TransformTargetError(TypeError, flax_errors.TransformTargetError):
  """``remat.linen.checkpoint`` was given something other than a Module class or a method.

  Also a ``flax.errors.TransformTargetError`` (what ``nn.remat`` raises for a
  Module instance) and a ``TypeError`` (what earlier versions raised); the
  message says what was given and what to pass instead.
  """

  def __init__(self, message: str):
    Exception.__init__(self, message)  # flax's __init__ would replace the message

  def __reduce__(self):
    return (type(self), (str(self),))


### Main API


def checkpoint(
    module_cls: type[nn.Module],
    *,
    static_argnums: int | Sequence[int] = (),
    policy: Callable[..., bool] | None = None,
    offload: Any = None,
    prevent_cse: bool = True,
    methods: Sequence[str] | None = None,
    variables: Any = True,
    rngs: Any = True,
    auto_static: bool = True,
) -> type[nn.Module]:
  """Checkpoints a ``flax.linen`` Module class; a drop-in for ``flax.linen.remat``.

  The returned class behaves as ``module_cls`` with its ``__call__`` (or the
  listed ``methods``) wrapped by :func:`remat.checkpoint`. Like
  ``nn.remat``, it also decorates a method in a class body
  (``@remat.linen.checkpoint`` above ``@nn.compact``). Under
  differentiation only the method's inputs, parameters and RNG keys are kept;
  the backward pass recomputes the rest.

  * Parameters: the same tree as ``module_cls`` (same class name, hence the
    same auto-generated names), so weights load unchanged.
  * RNG streams (``dropout`` and any stream read with ``make_rng``) are passed
    as explicit keys: the recomputation draws the same masks, and gradients
    equal those of the plain module with the same ``rngs``. The keys are tied
    to the method's inputs, so per-block checkpoints with dropout compile to
    less memory than ``nn.remat``'s (whose dropout bits XLA:CPU may generate
    for every block up front).
  * Mutable collections (``batch_stats``, ``intermediates``, caches) are
    updated once, from the forward pass, with the values the plain module
    gives.
  * Works inside ``nn.scan``, ``nn.jit`` and ``jax.jit``. On XLA:CPU compile
    the step with ``remat.jit``, otherwise the CPU compiler undoes the saving.

  Args:
    module_cls: a subclass of ``flax.linen.Module`` (or a ``functools.partial``
      of one), or a method (a function whose first argument is ``self``).
    static_argnums: positions of static arguments of the wrapped method,
      counting ``self`` as 0 as ``flax.linen.remat`` does: for
      ``__call__(self, x, train)`` use ``static_argnums=(2,)``. Python
      ``bool``, ``str`` and ``None`` arguments are static without being
      listed, unless ``auto_static=False``.
    policy: optional ``jax.checkpoint_policies`` policy naming the
      intermediates to keep (selective recomputation); passed to
      :func:`remat.checkpoint`.
    offload: optional ``remat.offload`` policy, passed to
      :func:`remat.checkpoint`. Its ``argnums``/``exclude_argnums`` count
      ``self`` as 0, like ``static_argnums``; the module's variables and RNG
      keys never move.
    prevent_cse: a bool, passed to :func:`remat.checkpoint`.
    methods: names of the methods to checkpoint; default ``("__call__",)``.
    variables: the variable collections lifted into the checkpointed function
      (a flax collection filter; default all).
    rngs: the PRNG streams lifted (a flax filter; default all).
    auto_static: make Python ``bool``/``str``/``None`` arguments static
      (default). ``False`` passes them on as ``nn.remat`` does with
      ``static_argnums=()``: bools become traced boolean arrays, so a method
      that branches on one in Python needs ``static_argnums``.

  Returns:
    A Module class with the same fields, name and parameter tree (or, for a
    method, the checkpointed method).

  Raises:
    TransformTargetError: if ``module_cls`` is neither a Module class nor a
      method (a ``flax.errors.TransformTargetError`` and a ``TypeError``).
    TypeError: if ``static_argnums`` is not an int or tuple of ints, ``methods`` is not a
      sequence of names, ``prevent_cse`` or ``auto_static`` is not a bool, or
      (at call time) a static argument is an array.
    ValueError: if ``static_argnums`` contains ``0`` (``self``) or a negative
      index, ``methods`` names a method the class does not have, or ``methods``
      is given while decorating a method.

  Example:

    >>> import jax, jax.numpy as jnp, flax.linen as nn, remat
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.Dense(4)(x)
    ...     return nn.Dropout(0.5, deterministic=not train)(x)
    >>> CBlock = remat.linen.checkpoint(Block, static_argnums=(2,))
    >>> x = jnp.ones((2, 4))
    >>> v = CBlock().init(jax.random.key(0), x, False)
    >>> jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
    ...     Block().init(jax.random.key(0), x, False))
    True
    >>> y = CBlock().apply(v, x, True, rngs={"dropout": jax.random.key(1)})
    >>> y.shape
    (2, 4)
  """
  nums = _check_static_argnums(static_argnums)
  # Check the remaining options once, where the user can see them.
  adapter_util.validate_passthrough(_API, policy=policy, offload=offload, prevent_cse=prevent_cse)
  adapter_util.check_flag(_API, "auto_static", auto_static)
  if not compat.HAS_LINEN_LIFT:
    return compat.linen_remat_fallback(module_cls, static_argnums=nums, policy=policy, offload=offload,
                                       prevent_cse=prevent_cse, methods=methods, variables=variables,
                                       rngs=rngs)
  lifted = functools.partial(_lift_checkpoint, variables=variables, rngs=rngs,
                             static_argnums=tuple(i - 1 for i in nums),  # no `self`
                             policy=policy, offload=_shift_offload(offload),
                             prevent_cse=prevent_cse, auto_static=auto_static)
  lifted.__name__ = "checkpoint"  # type: ignore[attr-defined]

  if _is_method(module_cls):  # `@remat.linen.checkpoint` on a method in a class body
    if methods is not None:
      raise ValueError(
          f"the `methods` argument to {_API} applies to Module classes, but "
          f"{_API} is decorating the method `{module_cls.__qualname__}`. Drop `methods`, or "
          "wrap the class: `remat.linen.checkpoint(MyModule, methods=[...])`.")
    _check_static_in_range(nums, module_cls, module_cls.__name__)
    return compat.decorator_lift_transform(
        functools.partial(lifted, method_name=module_cls.__name__), module_cls)

  base = _check_module_class(module_cls)
  method_names = _check_methods(methods, base)
  for name in method_names:
    _check_static_in_range(nums, getattr(base, name), name)
  out = compat.lift_transform(
      lifted, module_cls, methods={name: {"method_name": name} for name in method_names})
  cls = out.func if isinstance(out, functools.partial) else out
  # Keep the original class name: linen derives auto-names (`Block_0`) from it.
  cls.__name__ = base.__name__
  cls.__qualname__ = base.__qualname__
  cls.__doc__ = base.__doc__
  return out


### Implementation


def _lift_checkpoint(fn, *, variables, rngs, static_argnums, policy, offload, prevent_cse,
                     auto_static=True, method_name="__call__"):
  """``flax.core.lift.checkpoint`` with ``remat.checkpoint`` in place of ``jax.checkpoint``."""

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
    name = method_name  # the error messages name the method, not flax's wrapper
    for i in static_argnums:
      if i >= len(args):
        # The index was checked against the method's signature when the class was wrapped, so
        # the caller left the argument out or passed it by keyword.
        kw = f" (and the keywords {', '.join(sorted(kwargs))})" if kwargs else ""
        raise ValueError(
            f"{_API}: `static_argnums` names position {i + 1} of `{name}` (counting `self` as 0), "
            f"but this call passed only {len(args) + 1} positional arguments{kw}. Pass that argument "
            "positionally. If the module sits in `flax.linen.Sequential`, that is the cause: it "
            "passes extra arguments such as `train` to its first layer only; call the blocks "
            "yourself, or use `remat.linen.Sequential`, which passes them to every layer.")
    static = adapter_util.static_set(args, [(i + 1, i) for i in static_argnums], api=_API, name=name,
                                     counting=" (counting `self` as 0)", auto=auto_static)
    static_kwargs = {k: v for k, v in kwargs.items() if auto_static and adapter_util.auto_static(v)}
    dyn_kwargs = {k: v for k, v in kwargs.items() if k not in static_kwargs}

    def rematted(variable_groups, rng_groups, *args, **dyn_kwargs):
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *args, **static_kwargs, **dyn_kwargs)
      return y, repack_fn(scope)

    rematted.__name__ = name
    checkpointed = transform_lib.checkpoint(
        rematted, static_argnums=tuple(sorted(i + 2 for i in static)), policy=policy,
        offload=offload, prevent_cse=prevent_cse)
    rng_groups, args, dyn_kwargs = _tie_keys(rng_groups, args, dyn_kwargs, static)
    return checkpointed(variable_groups, rng_groups, *args, **dyn_kwargs)

  return compat.lift_pack(inner, (variables,), (variables,), (rngs,), name="remat",
                   enable_kwargs=True)


def _tie_keys(rng_groups, args, dyn_kwargs, static):
  """The lifted PRNG keys and the dynamic arguments through ``barrier.tie_keys`` (docs/facts.md,
  fact 11); the variables stay out, and nothing is tied when no RNG stream is lifted."""
  if not jax.tree_util.tree_leaves(rng_groups):
    return rng_groups, args, dyn_kwargs
  dyn = [i for i in range(len(args)) if i not in static]
  rng_groups, tied, dyn_kwargs = barrier_lib.tie_keys(
      (rng_groups, [args[i] for i in dyn], dyn_kwargs))
  args = list(args)
  for i, a in zip(dyn, tied, strict=True):
    args[i] = a
  return rng_groups, tuple(args), dyn_kwargs


def _shift_offload(offload):
  """Maps an offload policy's positions (``self`` = 0) onto ``rematted(variables, rngs, *args)``."""
  if offload is None or not hasattr(offload, "with_leading_arguments"):
    return offload
  changes = {}
  for field in ("argnums", "exclude_argnums"):
    nums = getattr(offload, field, None)
    if nums:
      if any(i < 1 for i in nums):
        raise ValueError(
            f"the `offload` argument to {_API}: `{field}` counts `self` as 0, as "
            f"`static_argnums` does, so positions must be >= 1, but got {nums!r}. For "
            "`__call__(self, x)` use `remat.offload.host(argnums=1)`.")
      changes[field] = tuple(i - 1 for i in nums)
  if changes:
    offload = dataclasses.replace(offload, **changes)
  return offload.with_leading_arguments(2)


def _is_method(fn) -> bool:
  """A function defined in a class body: its first parameter is ``self``."""
  if isinstance(fn, type) or not inspect.isfunction(inspect.unwrap(fn)):
    return False
  try:
    params = list(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return False
  return bool(params) and params[0] == "self"


def _check_module_class(module_cls) -> type[nn.Module]:
  base = module_cls.func if isinstance(module_cls, functools.partial) else module_cls
  if isinstance(base, type) and issubclass(base, nn.Module):
    return base
  if isinstance(base, nn.Module):
    hint = (f"got an instance of `{type(base).__name__}`; wrap the class instead: "
            f"`remat.linen.checkpoint({type(base).__name__})(...)`")
  elif isinstance(base, type):
    hint = f"got the class `{base.__name__}`, which is not a subclass of `flax.linen.Module`"
  elif callable(base):
    hint = (f"got {getattr(base, '__qualname__', base)!r}, which is neither a Module class "
            "nor a method (a function whose first argument is `self`). Decorate a method in "
            "the class body (`@remat.linen.checkpoint` above `@nn.compact`), or wrap the class: "
            "`remat.linen.checkpoint(MyModule, methods=['encode'])`")
  else:
    hint = f"got {base!r} of type {type(base).__name__}"
  raise TransformTargetError(
      f"{_API} expects a `flax.linen.Module` subclass, but {hint}. For a plain "
      "function of arrays use `remat.checkpoint`; for NNX modules use "
      "`remat.nnx.checkpoint`.")


def _check_static_argnums(static_argnums) -> tuple[int, ...]:
  nums = static_argnums_of(static_argnums, api=_API, example="static_argnums=(2,)",
                           note="counting `self` as 0")
  bad = [int(i) for i in nums if i < 1]
  if bad:
    raise ValueError(
        f"the `static_argnums` argument to {_API} counts `self` as 0, as "
        f"`flax.linen.remat` does, so indices must be >= 1, but got "
        f"{tuple(int(i) for i in nums)!r}. For `__call__(self, x, train)` use "
        "`static_argnums=(2,)`.")
  return tuple(int(i) for i in nums)


def _check_methods(methods, base) -> tuple[str, ...]:
  if methods is None:
    return ("__call__",)
  if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or not all(
      isinstance(m, str) for m in methods):
    raise TypeError(
        f"the `methods` argument to {_API} must be None or a list/tuple of method "
        f"names, e.g. `methods=['__call__', 'encode']`, but got {methods!r}.")
  unknown = [m for m in methods if not callable(getattr(base, m, None))]
  if unknown:
    raise ValueError(
        f"the `methods` argument to {_API} names {unknown!r}, which "
        f"`{base.__name__}` does not define. Its methods are: "
        f"{sorted(_own_methods(base))!r}.")
  return tuple(methods)


def _own_methods(base) -> set[str]:
  """Methods defined by ``base`` or its user-defined ancestors (not ``nn.Module``'s)."""
  names = set()
  for klass in base.__mro__:
    if klass is nn.Module or klass is object:
      break
    names.update(n for n, v in vars(klass).items() if callable(v) or isinstance(v, (
        staticmethod, classmethod)))
  return names


def _check_static_in_range(nums, method, name):
  n = positional_arity(method)
  if n is None:
    return
  sig = inspect.signature(method)
  bad = [i for i in nums if i >= n]
  if bad:
    raise ValueError(
        f"the `static_argnums` argument to {_API} is out of range for `{name}`: got "
        f"{nums!r}, but `{name}{sig}` takes {n} positional arguments counting "
        f"`self` as 0. Use indices in [1, {n}).")
