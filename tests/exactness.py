"""Gradient equality of recomputed and plain programs, as exact as the installed jax compiles it.

On jax 0.10, XLA:CPU compiles a checkpointed step whose gradients are bit-identical to plain
backprop's, dropout included. From jax 0.11 XLA:CPU keeps rematerialization by itself
(docs/facts.md, fact 20) and fuses the recomputed forward pass differently from the taped one:
gradients then differ from plain by rounding (measured on jax 0.12.0.1: at most 3.7e-5 relative,
7.5e-8 absolute on the test LMs), for ``flax.linen.remat`` exactly as for ours (docs/facts.md,
fact 23). A different dropout mask changes a gradient by the order of the gradient itself, so
the tolerance below still tells whether the recomputation drew the same masks.
"""

import chex
import jax
import numpy as np

from remat._src.util import compat

BIT_EXACT = compat.JAX_VERSION < (0, 11)


def assert_same_gradients(got, want):
  """Bit-identical where the installed jax compiles recomputation exactly, else equal to rounding."""
  if BIT_EXACT:
    chex.assert_trees_all_equal(got, want)
  else:
    assert_close_to_scale(got, want)


def assert_close_to_scale(got, want, rel: float = 1e-5):
  """Every leaf within ``rel`` times the leaf's largest magnitude (gradients are sums: an entry
  that cancels to near zero carries the rounding of its large terms)."""
  chex.assert_trees_all_equal_structs(got, want)
  for path, g, w in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                        jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    err, scale = float(np.max(np.abs(g - w), initial=0.0)), float(np.max(np.abs(w), initial=0.0))
    assert err <= rel * scale + 1e-30, (
        f"{jax.tree_util.keystr(path[0])}: differs by {err:.3g}, more than {rel} x {scale:.3g}")
