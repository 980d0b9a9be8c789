"""``remat.nnx.Sequential``: ``flax.nnx.Sequential`` run under a checkpointing plan.

A subclass of ``nnx.Sequential`` (same state tree: ``layers/0``, ``layers/1``
...). At call time the segmenter plans for the traced shapes; each
checkpointed segment runs through ``remat.nnx.checkpoint`` with the segment's
layers passed as module arguments, nested as the plan nests, so RNG counters
and other state the layers change are written back once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from remat._src.chains import execute
from remat._src.adapters import nnx as nnx_lib
from remat._src.core import policies
from remat._src.chains import sequential as seq_lib
from remat._src.plans.plan import Plan
from remat._src.plans.segmenters import check_segmenter

_API = "`remat.nnx.Sequential`"


class Sequential(nnx.Sequential):
  """``flax.nnx.Sequential`` whose layers run under a plan chosen by a segmenter.

  Every layer is called as ``layer(x, *args, **kwargs)``; the state tree is
  that of ``nnx.Sequential(*fns)``.

  Args:
    *fns: the layers (NNX modules or functions ``x -> y``).
    segmenter: a segmenter from ``remat.segmenters``, a ``remat.Plan`` for
      ``len(fns)`` layers, or ``None`` (plain backprop).

  Raises:
    ValueError: if there are no layers, or a plan is for another number of layers.
    TypeError: if ``segmenter`` is not a segmenter, a plan or ``None``.

  Example:

    >>> import jax.numpy as jnp, remat
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = remat.nnx.Sequential(*[nnx.Linear(8, 8, rngs=rngs) for _ in range(6)],
    ...                              segmenter=remat.segmenters.revolve(2))
    >>> grads = nnx.grad(lambda m, x: m(x).sum())(model, jnp.ones((4, 8)))
    >>> grads["layers"][0]["kernel"].shape
    (8, 8)
  """

  def __init__(self, *fns: Callable[..., Any], segmenter: Any = None):
    if not fns:
      raise ValueError(f"{_API} needs at least one layer, but got none.")
    if len(fns) == 1 and isinstance(fns[0], (list, tuple)):
      raise TypeError(
          f"{_API} takes its layers as separate arguments, as `nnx.Sequential` does, but got one "
          f"{type(fns[0]).__name__} of {len(fns[0])}; write `remat.nnx.Sequential(*layers, "
          "segmenter=...)`.")
    for i, fn in enumerate(fns):
      if not callable(fn):
        raise TypeError(f"layer {i} of {_API} must be callable (an `nnx.Module` or a function), "
                        f"but got {type(fn).__name__}: {fn!r:.80}.")
    if segmenter is not None:
      check_segmenter(segmenter, f"the `segmenter` of {_API}", len(fns))
    super().__init__(*fns)
    self.segmenter = segmenter

  def plan_for(self, x, *args, **kwargs) -> Plan:
    """The plan used for input ``x``."""
    seg = self.segmenter
    if seg is None:
      return seq_lib.plain_plan(len(self.layers))
    if isinstance(seg, Plan):
      return seg
    if not seg.needs_costs:
      return seg.plan(len(self.layers))
    # Measuring traces the layers in compiles of its own: graph state passed at call time (an
    # `nnx.Rngs`) is rebuilt inside each trace from a snapshot, so measuring never advances the
    # caller's counters (nor mutates state across trace levels).
    args, kwargs = _snapshots(args), _snapshots(kwargs)
    call = lambda layer, x: layer(x, *_rebuilt(args), **_rebuilt(kwargs))  # noqa: E731
    fns, states = [], []
    for layer in self.layers:  # pure functions of the layers' state, for measuring
      if isinstance(layer, nnx.Module):
        gd, st = nnx.split(layer)
        states.append(st)
        fns.append(lambda s, x, key, gd=gd: call(nnx.merge(gd, s), x))
      else:
        states.append(())
        fns.append(lambda s, x, key, f=layer: call(f, x))
    return seq_lib.chain_plan(fns, seg, states, x, None)

  def __call__(self, x, *args, **kwargs):
    plan = self.plan_for(x, *args, **kwargs)
    # Call arguments that hold graph state (an `nnx.Rngs` drawn from at call time, a module, a
    # Variable) are arguments of every checkpointed segment, as the layers are: state changed
    # inside a checkpoint must enter it as an argument to be written back. The others (arrays,
    # flags) stay in the closure, where `remat.checkpoint` hoists traced values.
    graph_values, put = nnx_lib.graph_arguments(args, kwargs)

    def run_layer(i, item, x):
      layer, values = item
      a, kw = put(values)
      return layer(x, *a, **kw)

    run = execute.build(plan.root, run_layer, _checkpoint_segment)
    return run([(layer, graph_values) for layer in self.layers], x)


class _Snapshot:
  """Graph state (a module, an ``nnx.Rngs``, a Variable) split once, merged anew where it is used."""

  def __init__(self, node):
    self.graphdef, self.state = nnx.split(node)

  def rebuild(self):
    return nnx.merge(self.graphdef, self.state, copy=True)  # new Variables, at the current trace level


def _snapshots(tree):
  is_node = nnx_lib.is_graph_node
  return jax.tree.map(lambda v: _Snapshot(v) if is_node(v) else v, tree, is_leaf=is_node)


def _rebuilt(tree):
  is_snap = lambda v: isinstance(v, _Snapshot)  # noqa: E731
  return jax.tree.map(lambda v: v.rebuild() if is_snap(v) else v, tree, is_leaf=is_snap)


def _checkpoint_segment(fn, offload: bool, policy: str | None = None):
  """A checkpointed segment's ``fn(modules, x)`` through ``remat.nnx.checkpoint``."""
  return nnx_lib.checkpoint(fn, offload=execute.OFFLOAD_INPUT if offload else None,
                            policy=None if policy is None else policies.policy_of(policy))
