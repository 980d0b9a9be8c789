"""``remat.linen.Sequential``: ``flax.linen.Sequential`` run under a checkpointing plan.

The layers stay submodules of the ``Sequential`` (same parameter tree as
``nn.Sequential``: ``layers_0``, ``layers_1`` ...). At trace time the plan is
made for the traced shapes by the segmenter; each checkpointed segment of the
plan is a method of this module lifted with ``remat.linen``'s checkpoint lift
(``flax.core.lift.pack`` around ``remat.checkpoint``), nested as the plan
nests. PRNG streams are carried by Flax exactly as in ``nn.Sequential``, so
dropout masks equal those of the plain ``nn.Sequential`` with the same
``rngs``.

``budget`` segmenters measure each distinct layer with XLA: the layer is
applied as a pure function of its variables (``layer.clone(parent=None)
.apply``) for the measurement and the verification compile.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from flax.linen import transforms as linen_transforms

from remat._src import linen as linen_lib
from remat._src import plan as plan_lib
from remat._src import segmenters as seg_lib
from remat._src import sequential as seq_lib

_API = "`remat.linen.Sequential`"


def _run(self, x, seg, *args, **kwargs):
  """Runs the layers of ``seg`` (children checkpointed as the plan says)."""
  if seg.children:
    for c in seg.children:
      x = (self._run_checkpointed if c.checkpoint else self._run_plain)(x, c, *args, **kwargs)
    return x
  for i in range(seg.start, seg.stop):
    x = self.layers[i](x, *args, **kwargs)
  return x


class Sequential(nn.Module):
  """``flax.linen.Sequential`` whose layers run under a plan chosen by a segmenter.

  Every layer is called as ``layer(x, *args, **kwargs)`` (unlike
  ``nn.Sequential``, which passes the extra arguments to the first layer only)
  so a ``train`` flag reaches every block; Python ``bool``, ``str`` and
  ``None`` arguments are static. The parameter tree is that of
  ``nn.Sequential(layers)``.

  Attributes:
    layers: the Modules (or functions ``x -> y``) of the chain.
    segmenter: a segmenter from ``remat.segmenters`` (``every(2)``,
      ``revolve(3)``, ``budget(2**30)`` ...), a ``remat.Plan`` for
      ``len(layers)`` layers, or ``None`` (plain backprop).

  Example:

    >>> import jax, jax.numpy as jnp, flax.linen as nn, remat
    >>> layers = [nn.Dense(8) for _ in range(6)]
    >>> model = remat.linen.Sequential(layers, segmenter=remat.segmenters.revolve(2))
    >>> x = jnp.ones((4, 8))
    >>> v = model.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
    ...     nn.Sequential([nn.Dense(8) for _ in range(6)]).init(jax.random.key(0), x))
    True
    >>> g = jax.grad(lambda v: model.apply(v, x).sum())(v)
  """

  layers: Sequence[Callable[..., Any]]
  segmenter: Any = None

  def __post_init__(self):
    if not isinstance(self.layers, (list, tuple)) or not self.layers:
      raise ValueError(f"{_API} needs a non-empty list of layers, but got {self.layers!r}.")
    if self.segmenter is not None and not (isinstance(self.segmenter, plan_lib.Plan)
                                           or callable(getattr(self.segmenter, "plan", None))):
      raise TypeError(
          f"the `segmenter` of {_API} must be a segmenter such as `remat.segmenters.sqrt()`, a "
          f"`remat.Plan` or None, but got {self.segmenter!r}.")
    if isinstance(self.segmenter, plan_lib.Plan) and self.segmenter.num_layers != len(self.layers):
      raise ValueError(f"{_API}: the plan is for {self.segmenter.num_layers} layers but there are "
                       f"{len(self.layers)}; make the plan with `segmenter.plan({len(self.layers)})`.")
    super().__post_init__()

  def __call__(self, x, *args, **kwargs):
    plan = self.plan_for(x, *args, **kwargs)
    return self._run_plain(x, plan.root, *args, **kwargs)

  def plan_for(self, x, *args, **kwargs) -> plan_lib.Plan:
    """The plan used for input ``x`` (plain backprop while initializing or without a segmenter)."""
    n = len(self.layers)
    if self.segmenter is None or self.is_initializing():
      return plan_lib.make_plan(plan_lib.Segment(0, n), None, n, "plain")
    if isinstance(self.segmenter, plan_lib.Plan):
      return self.segmenter
    if not isinstance(self.segmenter, seg_lib.budget):
      return self.segmenter.plan(n)
    self._check_collections()
    fns, variables = self._layer_functions(args, kwargs)
    key = self._probe_key()
    return seq_lib.plan_for_chain(fns, self.segmenter, variables, x, key)

  _run_plain = _run
  _run_checkpointed = linen_transforms.lift_transform(
      functools.partial(linen_lib._lift_checkpoint, variables=True, rngs=True, static_argnums=(1,),
                        policy=None, offload=None, prevent_cse=True),
      _run)

  ### Helpers for measuring the layers as pure functions

  def _check_collections(self):
    for i, layer in enumerate(self.layers):
      if isinstance(layer, nn.Module):
        extra = [c for c in layer.variables if c != "params" and self.is_mutable_collection(c)]
        if extra:
          raise NotImplementedError(
              f"{_API} with `remat.segmenters.budget` measures layers as pure functions of their "
              f"parameters; layer {i} updates the collections {extra}. Use a fixed segmenter "
              "(`every`, `sqrt`, `revolve` ...) or apply without `mutable`.")

  def _probe_key(self):
    return jax.random.key(0) if self.has_rng("dropout") else None

  def _layer_functions(self, args, kwargs):
    fns, variables = [], []
    for layer in self.layers:
      if isinstance(layer, nn.Module):
        unbound = layer.clone(parent=None)
        variables.append(dict(layer.variables))

        def fn(v, x, key, unbound=unbound):
          rngs = None if key is None else {"dropout": key}
          return unbound.apply(v, x, *args, rngs=rngs, **kwargs)
      else:
        variables.append(())

        def fn(v, x, key, layer=layer):
          return layer(x, *args, **kwargs)
      fns.append(fn)
    return fns, variables
