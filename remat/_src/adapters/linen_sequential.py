"""``remat.linen.Sequential``: ``flax.linen.Sequential`` run under a checkpointing plan.

The layers stay submodules of the ``Sequential`` (same parameter tree as
``nn.Sequential``: ``layers_0``, ``layers_1`` ...). When applied, each layer is
run as a pure function of its variables (``layer.clone(parent=None).apply``)
and the chain goes through ``remat.sequential``: the plan is made for the
traced shapes, checkpoints nest as the plan nests, and every PRNG stream gets
one key per layer (``remat.rng.layer_key``) tied to the layer's input.

Why not flax's own RNG plumbing (``lift.pack``, as ``remat.linen.checkpoint``
does)? A plan nests checkpoints over several layers, so the layers run as pure
functions with explicit per-layer keys, each tied to the layer's input by an
optimization barrier (docs/facts.md, fact 11: otherwise XLA:CPU generates every
block's dropout bits up front and keeps them alive). The masks therefore differ
from ``nn.Sequential``'s; they are the same with and without checkpointing, for
every segmenter.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn

from remat._src.chains import execute
from remat._src.chains import sequential as seq_lib
from remat._src.plans.plan import Plan
from remat._src.plans.segmenters import check_segmenter

_API = "`remat.linen.Sequential`"


class Sequential(nn.Module):
  """``flax.linen.Sequential`` whose layers run under a plan chosen by a segmenter.

  Every layer is called as ``layer(x, *args, **kwargs)`` (unlike
  ``nn.Sequential``, which passes the extra arguments to the first layer only)
  so a ``train`` flag reaches every block. The parameter tree is that of
  ``nn.Sequential(layers)``. PRNG streams named in ``rng_streams`` that the
  caller provides (``rngs={"dropout": key}``) are split into one key per
  layer; gradients are identical for every segmenter (``None`` included), and
  the masks differ from ``nn.Sequential``'s (see the module docstring).
  Collections the layers would update (``batch_stats`` with ``mutable=``) are
  not supported: use ``remat.linen.checkpoint`` on such blocks.

  Attributes:
    layers: the Modules (or functions ``x -> y``) of the chain.
    segmenter: a segmenter from ``remat.segmenters`` (``every(2)``,
      ``revolve(3)``, ``budget(2**30)`` ...), a ``remat.Plan`` for
      ``len(layers)`` layers, or ``None`` (plain backprop).
    rng_streams: the PRNG streams handed to the layers.

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
    >>> model.apply(v, x, method="plan_for").forward_evaluations
    14
  """

  layers: Sequence[Callable[..., Any]]
  segmenter: Any = None
  rng_streams: Sequence[str] = ("dropout",)

  def __post_init__(self):
    if not isinstance(self.layers, (list, tuple)) or not self.layers:
      raise ValueError(f"{_API} needs a non-empty list of layers, but got {self.layers!r}.")
    if self.segmenter is not None:
      check_segmenter(self.segmenter, f"the `segmenter` of {_API}", len(self.layers))
    super().__post_init__()

  def __call__(self, x, *args, **kwargs):
    if self.is_initializing():
      for layer in self.layers:   # create the parameters as nn.Sequential does
        x = layer(x, *args, **kwargs)
      return x
    self._check_collections()
    fns, variables = self._layer_functions(args, kwargs)
    keys = self._keys()
    plan = self._plan(fns, variables, x, keys)
    return execute.apply_plan(plan, fns, variables, x, keys)

  def plan_for(self, x, *args, **kwargs) -> Plan:
    """The plan used for input ``x`` (``model.apply(v, x, method="plan_for")``)."""
    fns, variables = self._layer_functions(args, kwargs)
    return self._plan(fns, variables, x, self._keys())

  def _plan(self, fns, variables, x, keys) -> Plan:
    if self.segmenter is None:
      return seq_lib.plain_plan(len(self.layers))
    return seq_lib.chain_plan(fns, self.segmenter, variables, x, keys)

  ### Helpers for measuring the layers as pure functions

  def _check_collections(self):
    for i, layer in enumerate(self.layers):
      if isinstance(layer, nn.Module):
        extra = [c for c in layer.variables if c != "params" and self.is_mutable_collection(c)]
        if extra:
          raise NotImplementedError(
              f"{_API} runs its layers as pure functions of their variables, but layer {i} "
              f"updates the collections {extra}. Apply without `mutable=`, or wrap such blocks "
              "with `remat.linen.checkpoint` instead.")

  def _keys(self):
    keys = {s: self.make_rng(s) for s in self.rng_streams if self.has_rng(s)}
    return keys or None

  def _layer_functions(self, args, kwargs):
    fns, variables = [], []
    for layer in self.layers:
      if isinstance(layer, nn.Module):
        unbound = layer.clone(parent=None)
        variables.append(dict(layer.variables))

        def fn(v, x, key, unbound=unbound):
          return unbound.apply(v, x, *args, rngs=key, **kwargs)
      else:
        variables.append(())

        def fn(v, x, key, layer=layer):
          return layer(x, *args, **kwargs)
      fns.append(fn)
    return fns, variables
