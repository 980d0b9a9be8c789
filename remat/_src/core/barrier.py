"""Optimization barriers: what keeps XLA from moving or merging a value.

``jax.lax.optimization_barrier`` returns its operands unchanged, but XLA may not
move computation across it or merge what is on either side. remat uses it for
two reasons, one helper each:

* ``barrier``: a checkpoint's backward pass recomputes from barrier'd inputs,
  so the compiler cannot find the recomputation equal to the forward pass and
  reuse the forward's values instead (common-subexpression elimination would
  undo the checkpoint; docs/facts.md, fact 1).
* ``tie_keys``: random bits depend on the PRNG key alone, so XLA's scheduler
  may generate the dropout bits of every layer at the start of the step and
  keep them all alive, as much memory as the activations checkpointing saved
  (docs/facts.md, fact 11). A barrier over a layer's keys *and* its inputs
  makes the keys available only when the layer can run.

Neither changes a value; PRNG keys pass through as their key data.
"""

from __future__ import annotations

from typing import Any

import jax

from remat._src.util.specs import is_key


def barrier(tree: Any) -> Any:
  """``optimization_barrier`` over every leaf it accepts (arrays; keys via their data).

  Example:

    >>> import jax.numpy as jnp
    >>> from remat._src.core.barrier import barrier
    >>> barrier({"x": jnp.ones(2), "flag": None})["x"].tolist()
    [1.0, 1.0]
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  picked = [i for i, x in enumerate(leaves)
            if x is not None and hasattr(x, "dtype") and x.dtype != jax.dtypes.float0]
  impls = {i: jax.random.key_impl(leaves[i]) for i in picked if is_key(leaves[i])}
  datas = jax.lax.optimization_barrier(
      [jax.random.key_data(leaves[i]) if i in impls else leaves[i] for i in picked])
  leaves = list(leaves)
  for i, d in zip(picked, datas, strict=True):
    leaves[i] = jax.random.wrap_key_data(d, impl=impls[i]) if i in impls else d
  return jax.tree_util.tree_unflatten(treedef, leaves)


def tie_keys(tree: Any) -> Any:
  """``tree`` (PRNG keys with the values they must wait for: a layer's inputs) under one barrier.

  See the module docstring (docs/facts.md, fact 11). Returns ``tree`` unchanged
  in value.
  """
  return barrier(tree)
