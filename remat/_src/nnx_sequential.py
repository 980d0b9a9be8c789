"""``remat.nnx.Sequential``: ``flax.nnx.Sequential`` run under a checkpointing plan.

A subclass of ``nnx.Sequential`` (same state tree: ``layers/0``, ``layers/1``
...). At call time the segmenter plans for the traced shapes; each
checkpointed segment runs through ``remat.nnx.checkpoint`` with the segment's
layers passed as module arguments, nested as the plan nests, so RNG counters
and other state the layers change are written back once.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from remat._src import execute
from remat._src import nnx as nnx_lib
from remat._src import policies
from remat._src import sequential as seq_lib
from remat._src.plan import Plan
from remat._src.segmenters import check_segmenter

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
    fns, states = [], []
    for layer in self.layers:  # pure functions of the layers' state, for measuring
      if isinstance(layer, nnx.Module):
        gd, st = nnx.split(layer)
        states.append(st)
        fns.append(lambda s, x, key, gd=gd: nnx.merge(gd, s)(x, *args, **kwargs))
      else:
        states.append(())
        fns.append(lambda s, x, key, f=layer: f(x, *args, **kwargs))
    return seq_lib.chain_plan(fns, seg, states, x, None)

  def __call__(self, x, *args, **kwargs):
    plan = self.plan_for(x, *args, **kwargs)
    run_layer = lambda i, layer, x: layer(x, *args, **kwargs)  # noqa: E731
    run = execute.build(plan.root, run_layer, _checkpoint_segment)
    return run(list(self.layers), x)


def _checkpoint_segment(fn, offload: bool, policy: str | None = None):
  """A checkpointed segment's ``fn(modules, x)`` through ``remat.nnx.checkpoint``."""
  return nnx_lib.checkpoint(fn, offload=execute.OFFLOAD_INPUT if offload else None,
                            policy=None if policy is None else policies.policy_of(policy))
