"""``remat.nnx.checkpoint``: ``flax.nnx.remat`` built on ``remat.checkpoint``.

``nnx.remat`` (graph mode) is ``jax.checkpoint`` between
``flax.nnx.transforms.general.split_inputs`` and ``merge_inputs``: the modules
among the arguments are split into a graph definition and their state (a
pytree of arrays) before the transform, merged back into modules inside it,
and the state the function changed (``BatchStat`` updates, RNG counters) comes
out as an output and is written back once. We put ``remat.checkpoint`` in the
middle. The RNG stream's key and count are inputs, so the recomputation in the
backward pass draws the same dropout masks, and the count advances exactly
once, as without checkpointing. They pass through one ``optimization_barrier``
with the array arguments before the checkpoint, so XLA cannot generate every
block's dropout bits at the start of the step (docs/facts.md, fact 11).

``graph=False`` (tree mode) and ``graph_updates=False`` follow ``nnx.remat``'s
other composition: flax's own ``SimpleRematFn`` (modules as pytrees, changed
``Variable``s returned as updates and written back after the call) with
``remat.checkpoint`` in place of ``jax.checkpoint``.

The core transform knows nothing of Flax; all Flax code is here.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from remat._src.adapters import adapter_util
from remat._src.core import barrier as barrier_lib
from remat._src.util import compat
from remat._src.util.signature import positional_arity, static_argnums_of, static_positions
from remat._src.core import transform as transform_lib
from remat._src.util import pytypes as rt

_API = "`remat.nnx.checkpoint`"
_CTXTAG = "remat"


def _flax_tree_mode():
  """flax's pieces of ``nnx.remat``'s tree mode: ``flax.nnx.extract`` and ``SimpleRematFn``."""
  if not compat.HAS_NNX_TREE_MODE:
    raise NotImplementedError(
        f"{_API}(graph=False) / (graph_updates=False) reuses flax's tree-mode remat "
        "(`flax.nnx.transforms.autodiff.SimpleRematFn` and `flax.nnx.extract`), which this flax "
        f"lacks ({compat.versions()}). Use the default graph mode, or flax >= 0.12.8.")
  return compat.nnx_extract, compat.nnx_simple_remat_fn


class BoundMethodError(TypeError, ValueError):
  """``remat.nnx.checkpoint`` was given a bound method of a Module instance.

  A ``ValueError``, as ``flax.nnx.remat`` raises for bound methods, and a
  ``TypeError``, as earlier versions of ``remat.nnx.checkpoint`` raised.
  """


### Main API


def checkpoint(
    f: rt.F | None = None,
    *,
    static_argnums: int | Sequence[int] = (),
    policy: Callable[..., bool] | None = None,
    offload: Any = None,
    prevent_cse: bool = True,
    graph: bool | None = None,
    graph_updates: bool | None = None,
    auto_static: bool = True,
) -> rt.F:
  """Checkpoints a function of NNX modules; a drop-in for ``flax.nnx.remat``.

  Use it on a function whose arguments include ``nnx.Module`` objects, or as a
  method decorator (``@remat.nnx.checkpoint`` on ``__call__``). Under
  ``nnx.grad``/``jax.grad`` only the inputs and the modules' state are kept;
  the backward pass recomputes the rest with :func:`remat.checkpoint`.

  * ``nnx.Dropout`` with ``nnx.Rngs``: the recomputation uses the same key, and
    the stream's count advances exactly as without checkpointing, so the next
    call draws fresh masks. Key and count are tied to the function's array
    inputs, so per-block checkpoints with dropout compile to less memory than
    ``nnx.remat``'s.
  * ``BatchStat`` (``nnx.BatchNorm`` running statistics) and other state the
    function changes are written back once, from the forward pass.
  * Works under ``nnx.jit``, ``nnx.grad``, ``nnx.scan`` and ``jax.jit``. On
    XLA:CPU compile with ``remat.jit``, otherwise the CPU compiler undoes the
    saving.

  Args:
    f: the function (or unbound method) to checkpoint. May be omitted to use
      ``remat.nnx.checkpoint(static_argnums=...)`` as a decorator factory.
    static_argnums: positions of static arguments of ``f`` (for a method,
      ``self`` is 0), as in ``nnx.remat``. Python ``bool``, ``str`` and
      ``None`` arguments are static without being listed (so a
      ``deterministic=`` flag works), unless ``auto_static=False``.
    policy: optional ``jax.checkpoint_policies`` policy naming intermediates to
      keep; passed to :func:`remat.checkpoint`.
    offload: optional ``remat.offload`` policy, passed to
      :func:`remat.checkpoint`.
    prevent_cse: a bool, passed to :func:`remat.checkpoint`.
    graph: as in ``nnx.remat``: ``True`` (graph mode: shared references and
      reference semantics) or ``False`` (tree mode: modules are treated as
      pytrees; shared ``Variable``s are not supported). ``None`` reads
      ``nnx.set_graph_mode``'s current value when decorating.
    graph_updates: as in ``nnx.remat``: whether changes to the graph
      structure made inside the function propagate to the inputs (no effect
      when ``graph=False``). ``None`` reads ``nnx.set_graph_updates``.
    auto_static: make Python ``bool``/``str``/``None`` arguments static
      (default). ``False`` passes them on as ``nnx.remat`` does with
      ``static_argnums=()``: bools become traced boolean arrays.

  Returns:
    The checkpointed function, with ``f``'s name and docstring.

  Raises:
    BoundMethodError: if ``f`` is a Module instance's bound method (a
      ``ValueError`` as in ``nnx.remat``, and a ``TypeError``).
    TypeError: if ``f`` is not callable (or is a Module class or instance),
      ``static_argnums`` is not an int or tuple of ints, ``graph``,
      ``graph_updates``, ``auto_static`` or ``prevent_cse`` is not a bool, or
      at call time a static argument is an array or a Module.
    ValueError: if a static argument index is out of range.

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> from flax import nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(4, 4, rngs=rngs)
    ...     self.drop = nnx.Dropout(0.5, rngs=rngs)
    ...   @remat.nnx.checkpoint
    ...   def __call__(self, x):
    ...     return self.drop(jnp.tanh(self.dense(x)))
    >>> block = Block(nnx.Rngs(0, dropout=1))
    >>> grads = nnx.grad(lambda m, x: m(x).sum())(block, jnp.ones((2, 4)))
    >>> grads["dense"]["kernel"].shape
    (4, 4)
  """
  nums = _check_static_argnums(static_argnums)
  adapter_util.validate_passthrough(_API, policy=policy, offload=offload, prevent_cse=prevent_cse)
  adapter_util.check_flag(_API, "auto_static", auto_static)
  if graph is None:
    graph = nnx.set_graph_mode.current_value()
  if graph_updates is None:
    graph_updates = nnx.set_graph_updates.current_value()
  adapter_util.check_flag(_API, "graph", graph)
  adapter_util.check_flag(_API, "graph_updates", graph_updates)
  if f is None:
    return functools.partial(checkpoint, static_argnums=nums, policy=policy,  # type: ignore[return-value]
                             offload=offload, prevent_cse=prevent_cse, graph=graph,
                             graph_updates=graph_updates, auto_static=auto_static)
  _check_callable(f)
  _check_static_in_range(nums, f)
  options = dict(policy=policy, offload=offload, prevent_cse=prevent_cse)
  tree_mode = not graph or not graph_updates
  transformed: dict[tuple[int, ...], Callable] = {}  # one per set of static positions

  @functools.wraps(f)
  def checkpointed(*args, **kwargs):
    if kwargs:
      args = tuple(compat.resolve_kwargs(f, args, kwargs))
    positions = zip(nums, static_positions(nums, len(args), _name(f), api=_API), strict=True)
    static = adapter_util.static_set(
        args, positions, api=_API, name=_name(f), auto=auto_static, what=_describe,
        traced=lambda a: adapter_util.has_array(a) or holds_graph_state(a))
    key = tuple(sorted(static))
    call = transformed.get(key)
    if call is None:
      call = transformed[key] = (_tree_transformed(f, key, graph=graph, **options) if tree_mode
                                 else _graph_transformed(f, key, **options))
    return call(*args)

  return adapter_util.api_boundary(checkpointed)  # type: ignore[return-value]


### Implementation


def _graph_transformed(f, static, *, policy, offload, prevent_cse):
  """``nnx.remat``'s graph-mode composition with ``remat.checkpoint`` in place of ``jax.checkpoint``.

  ``merge_inputs`` returns the state of every module argument after the call,
  changed or not; ``remat.checkpoint`` hands back unchanged inputs without
  making them outputs of the checkpoint (they would get zero cotangents).
  """
  if not compat.HAS_NNX_SPLIT_MERGE:
    return compat.nnx_remat_fallback(f, static, policy=policy, offload=offload, prevent_cse=prevent_cse)
  merged = compat.nnx_merge_inputs(f, ctxtag=_CTXTAG)
  inner = transform_lib.checkpoint(merged, static_argnums=static, policy=policy,
                                   offload=offload, prevent_cse=prevent_cse)

  @functools.wraps(inner)
  def tied(*pure_args):
    return inner(*_tie_rng_state(pure_args, static))

  return compat.nnx_update_context(_CTXTAG)(compat.nnx_split_inputs(tied, ctxtag=_CTXTAG))


def _tree_transformed(f, static, *, graph, policy, offload, prevent_cse):
  """``nnx.remat``'s tree-mode composition (``graph=False`` or ``graph_updates=False``)."""
  extract, simple_remat_fn = _flax_tree_mode()
  inner = transform_lib.checkpoint(simple_remat_fn(f, graph=graph), static_argnums=static,
                                   policy=policy, offload=offload, prevent_cse=prevent_cse)

  def call(*args):
    if graph:
      args = extract.to_tree2(args)
    variables = extract.check_no_aliases("remat", args=args, kwargs={})
    out, updates = inner(*_tie_rng_state(args, static))
    if graph:
      out = extract.from_tree2(out)
    extract.apply_updates(variables, updates)
    return out

  return call


def _tie_rng_state(args, static):
  """RNG state (``RngKey``, ``RngCount``) and the array arguments through ``barrier.tie_keys``
  (docs/facts.md, fact 11); parameters and other state stay out, and nothing is tied when the
  arguments carry no RNG state."""
  is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
  flat = [None if i in static else jax.tree_util.tree_flatten(a, is_leaf=is_var)
          for i, a in enumerate(args)]
  if not any(isinstance(leaf, nnx.RngState) for f in flat if f for leaf in f[0]):
    return args
  picked = []  # (argument, leaf, sub-treedef or None for a plain array, values)
  for i, f in enumerate(flat):
    for j, leaf in enumerate(f[0] if f else ()):
      if isinstance(leaf, nnx.RngState):
        values, sub = jax.tree_util.tree_flatten(leaf)
        picked.append((i, j, sub, values))
      elif not is_var(leaf) and hasattr(leaf, "dtype"):
        picked.append((i, j, None, [leaf]))
  tied = barrier_lib.tie_keys([values for *_, values in picked])
  leaves = {i: list(f[0]) for i, f in enumerate(flat) if f}
  for (i, j, sub, _), values in zip(picked, tied, strict=True):
    leaves[i][j] = values[0] if sub is None else jax.tree_util.tree_unflatten(sub, values)
  return tuple(a if i in static else jax.tree_util.tree_unflatten(flat[i][1], leaves[i])
               for i, a in enumerate(args))


def _name(f) -> str:
  return getattr(f, "__qualname__", None) or getattr(f, "__name__", repr(f))


def is_graph_node(x) -> bool:
  """Whether ``x`` is NNX graph state itself: a Module, an ``nnx.Rngs`` (any ``nnx.Pytree``), a Variable."""
  return isinstance(x, (nnx.Pytree, nnx.Variable))


def holds_graph_state(x) -> bool:
  """Whether ``x`` is or contains NNX graph state (see :func:`is_graph_node`)."""
  return any(is_graph_node(leaf) for leaf in jax.tree_util.tree_leaves(x, is_leaf=is_graph_node))


def graph_arguments(args: tuple, kwargs: dict) -> tuple[tuple, Callable]:
  """The call arguments that hold graph state, and ``put(values) -> (args, kwargs)`` with replacements.

  ``remat.nnx.Sequential`` and ``remat.nnx.Scan`` pass such arguments (an
  ``nnx.Rngs`` drawn from at call time) into their checkpoints or scans as
  state, and put the traced copies back where the caller had them.
  """
  at = [i for i, a in enumerate(args) if holds_graph_state(a)]
  at += [k for k, v in kwargs.items() if holds_graph_state(v)]

  def put(values) -> tuple[list, dict]:
    a, kw = list(args), dict(kwargs)
    for i, v in zip(at, values, strict=True):
      if isinstance(i, int):
        a[i] = v
      else:
        kw[i] = v
    return a, kw

  return tuple(args[i] if isinstance(i, int) else kwargs[i] for i in at), put



def _describe(x) -> str:
  return f"an `{type(x).__name__}` module" if isinstance(x, nnx.Module) else adapter_util.describe(x)


def _check_callable(f):
  if isinstance(f, type) and issubclass(f, nnx.Module):
    raise TypeError(
        f"{_API} expects a function or an unbound method, but got the Module class "
        f"`{f.__name__}`. Decorate its `__call__` (`@remat.nnx.checkpoint` in the class "
        "body), or wrap a function: `remat.nnx.checkpoint(lambda m, x: m(x))`. For "
        "linen Module classes use `remat.linen.checkpoint`.")
  if not callable(f):
    raise TypeError(
        f"{_API} expects a callable (a function of NNX modules or an unbound method), "
        f"but got {f!r} of type {type(f).__name__}.")
  unbound = f
  while isinstance(unbound, functools.partial):
    unbound = unbound.func
  if inspect.ismethod(unbound) and isinstance(unbound.__self__, nnx.Module):
    f = unbound
    raise BoundMethodError(
        f"{_API} got the bound method `{_name(f)}` of a Module instance; NNX transforms "
        "need the module as an argument so its state can be tracked. Wrap the unbound "
        f"function instead: `remat.nnx.checkpoint(type(m).{f.__name__})(m, ...)` or "
        "`remat.nnx.checkpoint(lambda m, x: m(x))(m, x)`.")
  if isinstance(f, nnx.Module):
    raise TypeError(
        f"{_API} got a Module instance of `{type(f).__name__}`; wrap a function of it "
        "instead: `remat.nnx.checkpoint(lambda m, x: m(x))(module, x)`.")


def _check_static_argnums(static_argnums) -> tuple[int, ...]:
  return static_argnums_of(static_argnums, api=_API, example="static_argnums=(2,)",
                           note="for a method `__call__(self, x, train)`, `self` is 0")


def _check_static_in_range(nums, f):
  n = positional_arity(f)
  if n is None:
    return
  sig = inspect.signature(f)
  bad = [i for i in nums if not -n <= i < n]
  if bad:
    raise ValueError(
        f"the `static_argnums` argument to {_API} is out of range: got {nums!r}, but "
        f"`{_name(f)}{sig}` takes {n} positional arguments. Use indices in [{-n}, {n}).")
