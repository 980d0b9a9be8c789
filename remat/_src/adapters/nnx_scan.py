"""``remat.nnx.Scan`` and ``remat.nnx.scan``: a stacked NNX block run as a segmenter plans.

NNX scans over layers with one module whose state is stacked on axis 0, made
by ``nnx.vmap`` over split ``nnx.Rngs`` (the recipe of flax's ``nnx.scan``
examples): ``remat.nnx.stack(make_block, length=N, rngs=rngs)`` is that
recipe. ``remat.nnx.scan(f, segmenter=...)`` runs ``f(block, x, ...)`` over
such a stack where ``nnx.scan(nnx.remat(f), in_axes=(0, nnx.Carry, ...))``
would, and ``remat.nnx.Scan`` is a module holding a stack in ``layers``.

How it runs (graph mode at the boundary, like ``nnx.scan``): the stack is
split once into its graph definition, its ``nnx.Param`` s and the rest of its
state (RNG keys and counts, batch statistics); ``execute.scan_levels`` scans
parameters and state together, rebuilds layer ``i`` with ``nnx.merge`` inside
the nested scans (whose bodies are ``remat.checkpoint`` s as the plan nests),
and returns every layer's state after the call, which is written back with
``nnx.update``. Each layer's RNG streams are its own (split when the stack was
made), and their counts are inputs of the checkpointed bodies: the
recomputation draws the same masks and every count advances once per call,
exactly as under ``nnx.scan(nnx.remat(f))``. No ``remat.nnx.checkpoint`` (and
so no ``graph=`` choice) is involved: the layers are pure functions of
their state inside the scan.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import nnx

from remat._src.adapters import adapter_util
from remat._src.chains import execute
from remat._src.adapters import nnx as nnx_lib
from remat._src.chains import scanned
from remat._src.plans import segmenters as seg_lib
from remat._src.util import specs

_API = "`remat.nnx.scan`"
_MODULE_API = "`remat.nnx.Scan`"


### Main API


def stack(make_block: Callable[[nnx.Rngs], nnx.Module], *, length: int, rngs: nnx.Rngs) -> nnx.Module:
  """``length`` blocks as one module with its state stacked on axis 0 (flax's ``nnx.scan`` recipe).

  ``nnx.split_rngs(splits=length)`` around ``nnx.vmap(make_block)``: every
  stream of ``rngs`` is split into one key per layer.

  Args:
    make_block: ``make_block(rngs) -> nnx.Module``, e.g. ``lambda rngs: Block(64, rngs=rngs)``.
    length: the number of layers, a positive int.
    rngs: an ``nnx.Rngs`` (``params``, and ``dropout`` for dropout blocks).

  Returns:
    A module of ``make_block``'s type whose state leaves have a leading axis ``length``.

  Raises:
    TypeError: if ``make_block`` is not callable or ``rngs`` is not an ``nnx.Rngs``.
    ValueError: if ``length`` is not a positive int.

  Example:

    >>> import remat
    >>> from flax import nnx
    >>> blocks = remat.nnx.stack(lambda rngs: nnx.Linear(4, 4, rngs=rngs), length=3, rngs=nnx.Rngs(0))
    >>> blocks.kernel.shape
    (3, 4, 4)
  """
  _check_length(length, "`remat.nnx.stack`")
  if not callable(make_block) or isinstance(make_block, nnx.Module):
    raise TypeError(f"`remat.nnx.stack` expects a function `make_block(rngs) -> nnx.Module`, but got "
                    f"{make_block!r}. Example: `lambda rngs: Block(64, rngs=rngs)`.")
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(f"`remat.nnx.stack` expects `rngs` to be an `nnx.Rngs`, but got {rngs!r}.")

  @nnx.split_rngs(splits=length)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return make_block(rngs)

  return create(rngs)


def scan(f: Callable | None = None, *, segmenter: Any = None) -> Callable:
  """Runs ``f(block, x, *args, **kwargs) -> x`` over the layers of a stacked module, as ``segmenter`` plans.

  The drop-in for ``nnx.scan(nnx.remat(f), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)``
  over a stack made with ``nnx.vmap`` (``remat.nnx.stack``): the returned
  ``g(blocks, x, *args, **kwargs)`` takes the stacked module first, the carried
  input next, and hands the other arguments to every layer. Regular plans run
  as nested ``lax.scan`` s with checkpointed bodies (``every(1)`` is
  ``nnx.scan(nnx.remat(f))``); irregular ones raise :class:`NotScannableError`
  naming segmenters that scan, and are never unrolled; ``budget(max_bytes)``
  picks the cheapest regular plan whose compiled temp memory fits. State the
  layers change (RNG counts, ``BatchStat`` s) is written back to ``blocks``.

  Args:
    f: the function of one layer. May be omitted to use ``remat.nnx.scan(segmenter=...)``
      as a decorator.
    segmenter: a segmenter from ``remat.segmenters``, ``budget(max_bytes)``,
      ``auto()``, a regular ``remat.Plan``, or ``None`` (a plain scan).

  Returns:
    ``g(blocks, x, *args, **kwargs)``, with ``g.plan_for(blocks, x, *args,
    **kwargs) -> ScanPlan``.

  Raises:
    TypeError: if ``f`` is not callable or ``segmenter`` is not a segmenter,
      plan or ``None``; when called, if ``blocks`` is not an ``nnx.Module``.
    ValueError: when called, if the state of ``blocks`` is not stacked on one
      leading axis.
    NotScannableError: when called, if the plan for that depth is not regular.

  Example:

    >>> import jax.numpy as jnp, remat
    >>> from flax import nnx
    >>> blocks = remat.nnx.stack(lambda rngs: nnx.Linear(8, 8, rngs=rngs), length=6, rngs=nnx.Rngs(0))
    >>> forward = remat.nnx.scan(lambda layer, x: jnp.tanh(layer(x)), segmenter=remat.segmenters.every(3))
    >>> grads = nnx.grad(lambda b, x: forward(b, x).sum())(blocks, jnp.ones((2, 8)))
    >>> grads["kernel"].shape
    (6, 8, 8)
    >>> forward.plan_for(blocks, jnp.ones((2, 8))).levels
    ((2, True), (3, False))
  """
  if f is None:
    return functools.partial(scan, segmenter=segmenter)  # type: ignore[return-value]
  if not callable(f) or isinstance(f, nnx.Module):
    raise TypeError(f"{_API} expects a function `f(block, x, *args) -> x`, but got {f!r}. To run a stacked "
                    "module's `__call__`, pass `lambda block, x: block(x)`.")
  if segmenter is not None:
    seg_lib.check_segmenter(segmenter, f"the `segmenter` of {_API}")

  @functools.wraps(f)
  def run(blocks, x, *args, **kwargs):
    return _run(f, segmenter, blocks, x, args, kwargs, plan_only=False, api=_API)

  def plan_for(blocks, x, *args, **kwargs) -> scanned.ScanPlan:
    return _run(f, segmenter, blocks, x, args, kwargs, plan_only=True, api=_API)

  run.plan_for = plan_for  # type: ignore[attr-defined]
  return run


class Scan(nnx.Module):
  """``length`` copies of a block, with stacked state, run as nested scans under a segmenter.

  ``layers`` holds the stacked block (``remat.nnx.stack(make_block, length,
  rngs)``), with the state tree, shapes and values of flax's ``nnx.vmap``
  recipe, so a stack trained with ``nnx.scan`` loads with
  ``nnx.update(scan.layers, state)``. Calling it runs
  ``remat.nnx.scan(lambda block, x, *a, **k: block(x, *a, **k), segmenter)``.

  Args:
    make_block: ``make_block(rngs) -> nnx.Module``.
    length: the number of layers, a positive int.
    rngs: an ``nnx.Rngs``; every stream is split into one key per layer.
    segmenter: a segmenter whose plan for ``length`` layers is regular,
      ``budget(max_bytes)``, ``auto()``, a regular ``remat.Plan``, or ``None``.

  Raises:
    TypeError: if an argument has the wrong type.
    ValueError: if ``length`` is not a positive int, or a plan is for another depth.
    NotScannableError: if the segmenter's plan for ``length`` layers is not regular.

  Example:

    >>> import jax.numpy as jnp, remat
    >>> from flax import nnx
    >>> model = remat.nnx.Scan(lambda rngs: nnx.Linear(8, 8, rngs=rngs), length=8,
    ...                        rngs=nnx.Rngs(0), segmenter=remat.segmenters.every(2))
    >>> grads = nnx.grad(lambda m, x: m(x).sum())(model, jnp.ones((4, 8)))
    >>> grads["layers"]["kernel"].shape
    (8, 8, 8)
    >>> print(model.plan_for(jnp.ones((4, 8))).levels)
    ((4, True), (2, False))
  """

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], *, length: int, rngs: nnx.Rngs,
               segmenter: Any = None):
    _check_length(length, _MODULE_API)
    scanned.check_scannable(segmenter, length, _MODULE_API)
    self.layers = stack(make_block, length=length, rngs=rngs)
    self.length = length
    self.segmenter = segmenter

  def __call__(self, x, *args, **kwargs):
    return _run(_call_block, self.segmenter, self.layers, x, args, kwargs, plan_only=False, api=_MODULE_API)

  def plan_for(self, x, *args, **kwargs) -> scanned.ScanPlan:
    """The :class:`ScanPlan` used for input ``x``."""
    return _run(_call_block, self.segmenter, self.layers, x, args, kwargs, plan_only=True, api=_MODULE_API)


### Implementation


def _call_block(block, x, *args, **kwargs):
  return block(x, *args, **kwargs)


def _run(f, segmenter, blocks, x, args, kwargs, *, plan_only: bool, api: str):
  if not isinstance(blocks, nnx.Module):
    raise TypeError(f"{api} expects a stacked `nnx.Module` (made with `remat.nnx.stack` or `nnx.vmap`) "
                    f"as its first argument, but got {blocks!r}.")
  graphdef, params, rest = nnx.split(blocks, nnx.Param, ...)
  n = _depth(params, rest, api)
  # Call arguments that hold graph state (an `nnx.Rngs` drawn from at call time, a module) are
  # shared by every layer: their state is carried through the scan with `x` (as `nnx.Carry`
  # would carry it), rebuilt in each layer and written back after the call.
  nodes, put = nnx_lib.graph_arguments(args, kwargs)
  splits = [nnx.split(node) for node in nodes]

  def layer(p, carry, r):
    block = nnx.merge(graphdef, p, r)
    if not nodes:
      y = f(block, carry, *args, **kwargs)
      return y, nnx.split(block, nnx.Param, ...)[2]
    x, states = carry
    fresh = [nnx.merge(gd, st, copy=True) for (gd, _), st in zip(splits, states, strict=True)]
    a, kw = put(fresh)
    y = f(block, x, *a, **kw)
    return (y, [nnx.split(node)[1] for node in fresh]), nnx.split(block, nnx.Param, ...)[2]

  x_in = (x, [st for _, st in splits]) if nodes else x
  needs_costs = scanned.measures_layer(segmenter)
  if needs_costs and adapter_util.has_array(put([None] * len(nodes))):  # arrays besides the graph state
    raise NotImplementedError(
        f"{api}: `{segmenter!r}` measures one block in a compile of its own, which cannot see array "
        "arguments besides `x`; make them module attributes, or use a uniform segmenter.")
  one = lambda t: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), t)  # noqa: E731
  plan = scanned.plan_stack(
      segmenter, n, api=api, layer=(lambda pr, x, k: layer(pr[0], x, pr[1])[0]) if needs_costs else None,
      p_spec=one((params, rest)), x_spec=specs.spec(x_in), k_spec=None)
  if plan_only:
    return plan
  if not plan.scanned:
    raise scanned.NotScannableError(plan.reason)
  y, new_rest = execute.scan_levels(layer, list(plan.levels), params, x_in, rest, outputs=True,
                                    policy=execute.layer_policy(plan.plan))
  nnx.update(blocks, new_rest)
  if nodes:
    y, states = y
    for node, st in zip(nodes, states, strict=True):
      nnx.update(node, st)
  return y


def _depth(params, rest, api) -> int:
  sizes = {}
  for path, a in jax.tree_util.tree_leaves_with_path((params, rest)):
    sizes.setdefault(int(a.shape[0]) if getattr(a, "ndim", 0) else None, jax.tree_util.keystr(path[1:]))
  if len(sizes) != 1 or None in sizes:
    shown = ", ".join(f"{path} ({'scalar' if k is None else k})" for k, path in list(sizes.items())[:4])
    raise ValueError(
        f"{api} expects every state leaf of the stacked module on one leading axis (the depth), but "
        f"found leading sizes {shown}. Make the stack with `remat.nnx.stack(make_block, length=N, "
        "rngs=rngs)` (`nnx.split_rngs` + `nnx.vmap`, as flax's `nnx.scan` examples do).")
  return next(iter(sizes))


def _check_length(length, api):
  if not isinstance(length, int) or isinstance(length, bool) or length < 1:
    raise ValueError(f"the `length` argument to {api} must be a positive int (the number of layers), "
                     f"but got {length!r}.")
