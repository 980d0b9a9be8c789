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

from remat._src import nnx as nnx_lib
from remat._src import plan as plan_lib
from remat._src import segmenters as seg_lib
from remat._src import sequential as seq_lib

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
    if segmenter is not None and not (isinstance(segmenter, plan_lib.Plan)
                                      or callable(getattr(segmenter, "plan", None))):
      raise TypeError(
          f"the `segmenter` of {_API} must be a segmenter such as `remat.segmenters.sqrt()`, a "
          f"`remat.Plan` or None, but got {segmenter!r}.")
    if isinstance(segmenter, plan_lib.Plan) and segmenter.num_layers != len(fns):
      raise ValueError(f"{_API}: the plan is for {segmenter.num_layers} layers but there are "
                       f"{len(fns)}; make the plan with `segmenter.plan({len(fns)})`.")
    super().__init__(*fns)
    self.segmenter = segmenter

  def plan_for(self, x, *args, **kwargs) -> plan_lib.Plan:
    """The plan used for input ``x``."""
    n = len(self.layers)
    seg = self.segmenter
    if seg is None:
      return plan_lib.make_plan(plan_lib.Segment(0, n), None, n, "plain")
    if isinstance(seg, plan_lib.Plan):
      return seg
    if not isinstance(seg, seg_lib.budget):
      return seg.plan(n)
    fns, states = [], []
    for layer in self.layers:
      if isinstance(layer, nnx.Module):
        gd, st = nnx.split(layer)
        states.append(st)
        fns.append(lambda s, x, key, gd=gd: nnx.merge(gd, s)(x, *args, **kwargs))
      else:
        states.append(())
        fns.append(lambda s, x, key, f=layer: f(x, *args, **kwargs))
    return seq_lib.plan_for_chain(fns, seg, states, x, None)

  def __call__(self, x, *args, **kwargs):
    plan = self.plan_for(x, *args, **kwargs)
    layers = list(self.layers)

    def run(seg, mods, x):
      if seg.children:
        for c in seg.children:
          sub = mods[c.start - seg.start:c.stop - seg.start]
          if c.checkpoint:
            x = nnx_lib.checkpoint(lambda m, x, c=c: run(c, m, x),
                                   offload=plan_lib.OFFLOAD_INPUT if c.offload else None)(sub, x)
          else:
            x = run(c, sub, x)
        return x
      for f in mods:
        x = f(x, *args, **kwargs)
      return x

    return run(plan.root, layers, x)
