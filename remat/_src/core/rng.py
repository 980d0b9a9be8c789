"""Explicit PRNG-key threading for checkpointed code.

The rule: **a checkpointed function draws randomness only from key arguments.**
The backward pass calls the function again with the same arguments, so it
draws the same masks. A key that is split *inside* the function from an
argument is fine too; what breaks exactness is randomness that is not a
function of the inputs (host RNG in a callback, a global counter).

These helpers derive one key per layer or per segment from one step key, for
typed keys (``jax.random.key``) and raw ``uint32[2]`` keys (``PRNGKey``) alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from remat._src.util import pytypes as rt

_API = "`remat.rng`"


def _check_key(key, fn: str):
  if key is None or not hasattr(key, "dtype"):
    raise TypeError(
        f"`remat.rng.{fn}` expects a PRNG key (`jax.random.key(0)` or "
        f"`jax.random.PRNGKey(0)`), but got {key!r}.")
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return
  if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
    return
  raise TypeError(
      f"`remat.rng.{fn}` expects a PRNG key (`jax.random.key(0)` or "
      f"`jax.random.PRNGKey(0)`), but got an array of dtype {key.dtype} and shape "
      f"{key.shape}.")


def layer_keys(key: rt.PRNGKey | None, num: int) -> rt.PRNGKey | list[None]:
  """One independent key per layer (or segment), stacked on a leading axis.

  Args:
    key: a typed or raw PRNG key, or ``None`` (deterministic model).
    num: how many keys.

  Returns:
    An array of ``num`` keys (same kind as ``key``), indexable as ``keys[i]``
    and scannable with ``lax.scan``; a list of ``num`` ``None`` when ``key``
    is ``None``.

  Raises:
    TypeError: if ``key`` is not a PRNG key.
    ValueError: if ``num`` is not a positive int.

  Example:

    >>> import jax, remat
    >>> keys = remat.rng.layer_keys(jax.random.key(0), 4)
    >>> keys.shape
    (4,)
  """
  if not isinstance(num, int) or isinstance(num, bool) or num < 1:
    raise ValueError(f"`remat.rng.layer_keys` needs a positive int `num`, but got {num!r}.")
  if key is None:
    return [None] * num
  _check_key(key, "layer_keys")
  return jax.random.split(key, num)


def layer_key(key: Any, index) -> Any:
  """The key of layer ``index``: ``fold_in(key, index)`` for a key or every key of a pytree.

  Args:
    key: a typed or raw PRNG key, a pytree of keys (one per stream, e.g.
      ``{"dropout": k}``), or ``None``.
    index: the layer index (an int or a traced integer, e.g. a scan counter).

  Returns:
    Keys of the same kind and structure; ``None`` stays ``None``.

  Raises:
    TypeError: if a leaf of ``key`` is not a PRNG key.

  Example:

    >>> import jax, remat
    >>> k3 = remat.rng.layer_key(jax.random.key(0), 3)
    >>> again = remat.rng.layer_key({"dropout": jax.random.key(0)}, 3)["dropout"]
    >>> bool((jax.random.key_data(k3) == jax.random.key_data(again)).all())
    True
  """
  def one(k):
    _check_key(k, "layer_key")
    return jax.random.fold_in(k, index)
  return jax.tree_util.tree_map(one, key)


def dropout(key: rt.PRNGKey, x: rt.Array, rate: float) -> rt.Array:
  """Inverted dropout driven by an explicit key (same key, same mask).

  Args:
    key: a typed or raw PRNG key.
    x: the activations.
    rate: probability of dropping each element, in ``[0, 1)``.

  Returns:
    ``x`` with dropped elements zeroed and the rest scaled by ``1/(1-rate)``.

  Raises:
    ValueError: if ``rate`` is outside ``[0, 1)``.

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> y = remat.rng.dropout(jax.random.key(0), jnp.ones(8), 0.5)
    >>> bool(((y == 0) | (y == 2)).all())
    True
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"`remat.rng.dropout` needs 0 <= rate < 1, but got rate={rate!r}.")
  if rate == 0.0:
    return x
  _check_key(key, "dropout")
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
