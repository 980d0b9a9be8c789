"""``remat.linen.scan``: ``flax.linen.scan`` over a block, checkpointed as a segmenter plans.

A class transform like ``nn.scan`` and ``nn.remat_scan``: the returned Module
class takes the block's own fields, runs the block ``length`` times (output of
one block is the input of the next) and keeps the parameters as ``nn.scan``
does, stacked on axis 0 directly under the module's name. Built on flax's
lifting (``flax/core/lift.py``, docs/facts.md, fact 9):

* ``init`` is ``lift.scan`` itself, so the initial variables are the ones
  ``nn.scan(Block, variable_axes=..., split_rngs=..., length=N)`` creates;
* ``apply`` packs the scanned collections and the PRNG streams into explicit
  arguments (``lift.pack``), splits every stream with ``split_rngs`` True into
  one key per layer exactly as ``lift.scan`` does, and runs the block, rebuilt
  in a scope per layer, through ``execute.scan_levels``: nested ``lax.scan``s
  whose bodies are ``remat.checkpoint``s, as the plan nests.

PRNG keys per layer: for each stream in ``split_rngs`` with ``True``, the
module's key is split into ``length`` keys (``jax.random.split(jax.random.clone
(key), length)``, as ``lift.scan``); layer ``i`` runs in a scope holding key
``i``, and the block's ``make_rng`` calls fold in their submodule path and a
call counter as anywhere in linen. The counters are rewound for every trace
(a recomputation or a cost measurement traces the block again), so the masks
are those of ``nn.scan(..., check_constancy_invariants=False)``, which traces
the block once; with its default ``True``, ``nn.scan`` traces the block twice
and its counters advance once more, which gives other (equally random) masks.
Streams with ``False`` give every layer the same key, as in ``nn.scan``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
from flax import linen as nn
from flax.core import FrozenDict

from remat._src.adapters import adapter_util
from remat._src.util import compat
from remat._src.chains import execute
from remat._src.chains import scanned
from remat._src.util import specs

_API = "`remat.linen.scan`"


### Main API


def scan(
    block_cls: type[nn.Module],
    *,
    length: int,
    segmenter: Any = None,
    variable_axes: Mapping[Any, int] = FrozenDict({True: 0}),
    split_rngs: Mapping[Any, bool] = FrozenDict({True: True}),
) -> type[nn.Module]:
  """Repeats a linen block ``length`` times over stacked parameters, checkpointed under a plan.

  ``nn.scan`` / ``nn.remat_scan`` with a segmenter: the block is called as
  ``block(x, *args, **kwargs)`` and returns the next ``x`` (extra arguments,
  such as a ``train`` flag, go to every layer unchanged). The plan runs as
  nested ``lax.scan``s, so compile time does not grow with ``length``:
  ``every(1)`` is ``nn.scan(nn.remat(Block))``, ``every(k)`` is
  ``nn.remat_scan(Block, lengths=(length // k, k))`` (with ``nn.scan``'s
  parameter layout), ``multilevel(2)`` nests one more level. Plans that are
  not regular (``revolve``, ``none()``, sizes that do not divide ``length``)
  raise :class:`NotScannableError` here, naming segmenters that scan;
  ``budget(max_bytes)`` picks the cheapest regular plan whose compiled temp
  memory fits. ``plan_for`` reports the plan: ``model.apply(v, x,
  method="plan_for")`` returns a :class:`ScanPlan`.

  Parameters: the tree of ``nn.scan(block_cls, variable_axes=variable_axes,
  split_rngs=split_rngs, length=length)``, every leaf stacked on axis 0, so
  variables of a model scanned with flax load unchanged (and ``init`` gives
  the same values). Weights of ``nn.remat_scan(lengths=(a, b))`` carry one
  axis per level: reshape them to ``(a * b, ...)``.

  PRNG streams: see the module docstring (one key per layer, split as
  ``nn.scan`` splits; gradients are bit-identical for every segmenter, and
  equal to ``nn.scan(block_cls, ..., check_constancy_invariants=False)``).
  Collections the block would update when applied (``batch_stats`` with
  ``mutable=``, ``sow``) are not supported.

  Args:
    block_cls: a ``flax.linen.Module`` subclass (or a ``functools.partial`` of
      one) whose ``__call__(x, *args, **kwargs)`` returns an ``x``-shaped output.
    length: the number of layers, a positive int.
    segmenter: a segmenter from ``remat.segmenters`` whose plan for ``length``
      layers is regular, ``budget(max_bytes)``, ``auto()``, a regular
      ``remat.Plan``, or ``None`` (a plain scan).
    variable_axes: the variable collections stacked on a leading axis, as in
      ``nn.scan``; the axis must be ``0``. Default: every collection.
    split_rngs: the PRNG streams split into one key per layer (``True``) or
      shared by all layers (``False``), as in ``nn.scan``. Default: all split.

  Returns:
    A Module class named ``Scan<Block>`` (the auto-name ``nn.scan`` gives) with
    ``block_cls``'s fields, ``__call__(x, *args, **kwargs)`` and
    ``plan_for(x, *args, **kwargs) -> ScanPlan``.

  Raises:
    TypeError: if ``block_cls`` is not a Module class, or ``variable_axes`` /
      ``split_rngs`` are not mappings of the right kind.
    ValueError: if ``length`` is not a positive int or an axis is not 0.
    NotScannableError: if the segmenter's plan is not regular (a ``ValueError``).

  Example:

    >>> import jax, jax.numpy as jnp, flax.linen as nn, remat
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return jnp.tanh(nn.Dense(8)(x))
    >>> Stack = remat.linen.scan(Block, length=6, segmenter=remat.segmenters.every(2))
    >>> x = jnp.ones((4, 8))
    >>> v = Stack().init(jax.random.key(0), x)
    >>> v["params"]["Dense_0"]["kernel"].shape
    (6, 8, 8)
    >>> g = jax.grad(lambda v: Stack().apply(v, x).sum())(v)
    >>> print(Stack().apply(v, x, method="plan_for").levels)
    ((3, True), (2, False))
  """
  compat.require_linen_scan(_API)
  base = _check_block(block_cls)
  if not isinstance(length, int) or isinstance(length, bool) or length < 1:
    raise ValueError(f"the `length` argument to {_API} must be a positive int (the number of layers), "
                     f"but got {length!r}.")
  axes = _check_variable_axes(variable_axes)
  splits = _check_split_rngs(split_rngs)
  scanned.check_scannable(segmenter, length, _API)
  options = dict(length=length, segmenter=segmenter, variable_axes=axes, split_rngs=splits)
  with_plan = type(base.__name__, (base,), {"plan_for": _plan_for, "__doc__": base.__doc__,
                                            "__module__": base.__module__})
  if isinstance(block_cls, functools.partial):
    with_plan = functools.partial(with_plan, *block_cls.args, **block_cls.keywords)
  out = compat.lift_transform(
      _lift_scan, with_plan,
      methods={"__call__": dict(mode="call", **options), "plan_for": dict(mode="plan", **options)})
  cls = out.func if isinstance(out, functools.partial) else out
  cls.__qualname__ = f"Scan{base.__qualname__}"
  cls.__doc__ = base.__doc__
  return out


def _plan_for(self, x, *args, **kwargs):
  """The :class:`ScanPlan` used for input ``x`` (``model.apply(v, x, method="plan_for")``)."""
  return self(x, *args, **kwargs)


### Implementation


def _lift_scan(fn: Callable, *, mode: str, length: int, segmenter: Any, variable_axes: dict,
               split_rngs: dict) -> Callable:
  """A scope transform (``lift_transform`` turns it into a class transform); see the module docstring."""
  var_filters, rng_filters = tuple(variable_axes), tuple(split_rngs)
  split_flags = tuple(split_rngs.values())

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, x, *args, **kwargs):
    del repack_fn  # nothing is written back
    _check_stacked(variable_groups, length)
    split = lambda k: jax.random.split(jax.random.clone(k), length)  # noqa: E731 - as lift.scan
    share = lambda k: jax.numpy.broadcast_to(k, (length,) + k.shape)  # noqa: E731
    keys = tuple(compat.lift_tree_map_rngs(split if s else share, g) for g, s in zip(rng_groups, split_flags,
                                                                               strict=True))
    counters = _Counters()

    def layer(p, x, key):
      scopes = scope_fn(p, key, mutable_filter=False)
      counters.rewind(scopes)
      return fn(scopes, x, *args, **kwargs)

    first = lambda t: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), t)  # noqa: E731
    needs_layer = scanned.measures_layer(segmenter)
    if needs_layer and adapter_util.has_array((args, kwargs)):
      raise NotImplementedError(
          f"{_API}: `{segmenter!r}` measures one block in a compile of its own, which cannot see "
          "array arguments besides `x`; pass them as module fields or use a uniform segmenter.")
    plan = scanned.plan_stack(segmenter, length, api=_API, layer=layer if needs_layer else None,
                              p_spec=first(variable_groups), x_spec=specs.spec(x), k_spec=first(keys))
    if mode == "plan":
      return plan, ()
    if not plan.scanned:  # refused when the class was made; a report only through `plan_for`
      raise scanned.NotScannableError(plan.reason)
    y = execute.scan_levels(layer, list(plan.levels), variable_groups, x, keys,
                            policy=execute.layer_policy(plan.plan))
    counters.publish()
    return y, ()

  packed = compat.lift_pack(inner, var_filters, (), rng_filters, name="scan", enable_kwargs=True)

  def init(scope_tree, x, *args, **kwargs):
    body = lambda scope, c: (fn(scope, c, *args, **kwargs), None)  # noqa: E731
    return compat.lift_scan(body, variable_axes=variable_axes, split_rngs=split_rngs, length=length)(
        scope_tree, x)[0]

  def wrapper(scope_tree, x, *args, **kwargs):
    scopes = _scopes(scope_tree)
    if mode == "call" and scopes[0].get_flag("initializing", False):
      return init(scope_tree, x, *args, **kwargs)
    if mode == "call":
      _check_immutable(scopes)
    return packed(scope_tree, x, *args, **kwargs)

  return wrapper


_lift_scan.__name__ = "scan"  # flax names the class `Scan<Block>`, the auto-name of nn.scan


class _Counters:
  """linen's per-scope RNG call counters, rewound for every trace of a layer and advanced once."""

  def __init__(self):
    self.saved: dict[int, tuple[dict, dict]] = {}
    self.last: dict[int, dict] = {}

  def rewind(self, scopes):
    for s in _scopes(scopes):
      shared = s.rng_counters  # the outer scope's counters, as lift.pack hands them in
      if id(shared) not in self.saved:
        self.saved[id(shared)] = (shared, _copy(shared))
      s.rng_counters = self.last[id(shared)] = _copy(self.saved[id(shared)][1])

  def publish(self):
    """Leaves the outer counters as one trace of the stack would."""
    for k, (shared, _) in self.saved.items():
      shared.clear()
      shared.update(self.last[k])


def _copy(counters: dict) -> dict:
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in counters.items()}


def _scopes(tree) -> list:
  return [s for s in jax.tree_util.tree_leaves(tree) if isinstance(s, compat.core_scope)]


def _check_immutable(scopes):
  for s in scopes:
    cols = sorted(c for c in set(s.variables()) | {"intermediates"} if s.is_mutable_collection(c))
    if cols:
      raise NotImplementedError(
          f"{_API} runs its layers as pure functions of their variables, so collections they "
          f"update are not written back; this call makes {cols} mutable. Apply without `mutable=` "
          "(or with the collections of other modules only), or use `nn.scan` for blocks that "
          "update state.")


def _check_stacked(variable_groups, n):
  bad = []
  for path, a in jax.tree_util.tree_leaves_with_path(variable_groups):
    if getattr(a, "ndim", 0) < 1 or a.shape[0] != n:
      bad.append(f"{jax.tree_util.keystr(path[2:])} with shape {tuple(getattr(a, 'shape', ()))}")
  if bad:
    raise ValueError(
        f"{_API} expects every scanned variable stacked on a leading axis of length {n} (the layout "
        f"of `nn.scan(..., length={n})`), but got {', '.join(bad[:3])}"
        f"{' ...' if len(bad) > 3 else ''}. Variables of `nn.remat_scan(lengths=(a, b))` carry one "
        f"axis per level: reshape them with `jax.tree.map(lambda a: a.reshape(({n},) + a.shape[2:]), "
        "params)`.")


def _check_block(block_cls) -> type[nn.Module]:
  base = block_cls.func if isinstance(block_cls, functools.partial) else block_cls
  if isinstance(base, type) and issubclass(base, nn.Module):
    return base
  hint = (f"an instance of `{type(base).__name__}`; pass the class: `remat.linen.scan("
          f"{type(base).__name__}, length=...)(...)`" if isinstance(base, nn.Module) else repr(base))
  raise TypeError(f"{_API} expects a `flax.linen.Module` subclass (the block to repeat), but got "
                  f"{hint}. For NNX modules use `remat.nnx.Scan`.")


def _check_variable_axes(variable_axes) -> dict:
  if not isinstance(variable_axes, Mapping) or not variable_axes:
    raise TypeError(f"the `variable_axes` argument to {_API} must be a non-empty mapping from "
                    f"collection filters to axes, e.g. `{{'params': 0}}`, but got {variable_axes!r}.")
  bad = {k: v for k, v in variable_axes.items() if not isinstance(v, int) or isinstance(v, bool) or v != 0}
  if bad:
    raise ValueError(f"the `variable_axes` argument to {_API}: the scanned stack keeps variables on axis 0 "
                     f"(nn.scan's default layout), but got {bad!r}; use `{{'params': 0}}`.")
  return dict(variable_axes)


def _check_split_rngs(split_rngs) -> dict:
  if not isinstance(split_rngs, Mapping) or not all(isinstance(v, bool) for v in split_rngs.values()):
    raise TypeError(f"the `split_rngs` argument to {_API} must be a mapping from PRNG stream filters to "
                    f"bools, e.g. `{{'params': True, 'dropout': True}}`, but got {split_rngs!r}.")
  return dict(split_rngs)
