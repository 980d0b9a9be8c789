"""Shapes, dtypes and shardings of what a chain sees: the per-device view that costs are measured in.

Under ``jax.sharding`` every memory figure XLA reports is per device
(docs/facts.md, fact 13), so the planner measures layers with the shardings
their inputs have. A sharding is known for concrete arrays, for
``jax.ShapeDtypeStruct`` s that carry one, and for tracers under explicit
sharding (``jax.make_mesh`` meshes, whose avals carry the partition spec). Under
an ``Auto`` mesh a tracer's layout is chosen later by XLA: such a value is
measured with its global shape.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


def spec(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` of every array leaf (tracers included), with its sharding where known."""
  def one(a):
    if hasattr(a, "shape") and hasattr(a, "dtype"):
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=known_sharding(a))
    return a
  return jax.tree_util.tree_map(one, tree)


def known_sharding(a: Any) -> NamedSharding | None:
  """A concrete multi-device ``NamedSharding`` of ``a`` if its layout is known, else ``None``."""
  s = getattr(a, "sharding", None)
  if s is None and isinstance(a, jax.core.Tracer):
    s = getattr(jax.typeof(a), "sharding", None)
  if not isinstance(s, NamedSharding) or s.mesh.size <= 1:
    return None
  if not any(p is not None for p in s.spec):
    # Replicated, or an Auto mesh that left the layout to XLA: measure globally.
    return NamedSharding(_concrete(s.mesh), s.spec) if _explicit(s.mesh) else None
  return NamedSharding(_concrete(s.mesh), s.spec)


def layout_unknown(tree: Any) -> bool:
  """Whether some leaf is a tracer on a multi-device mesh whose layout XLA chooses later (``Auto``)."""
  for a in jax.tree_util.tree_leaves(tree):
    if isinstance(a, jax.core.Tracer):
      s = getattr(jax.typeof(a), "sharding", None)
      if isinstance(s, NamedSharding) and s.mesh.size > 1 and known_sharding(a) is None \
          and not _explicit(s.mesh):
        return True
  return False


def device_bytes(tree: Any) -> int:
  """Bytes of one device's shard of every array leaf of ``tree``."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
      continue
    s = getattr(x, "sharding", None)
    shape = s.shard_shape(x.shape) if isinstance(s, NamedSharding) else x.shape
    total += math.prod(shape) * _itemsize(x.dtype)
  return total


def describe(tree: Any) -> str:
  """Shapes and shardings, for cache keys."""
  return str([(getattr(x, "shape", None), str(getattr(x, "dtype", "")),
               str(getattr(getattr(x, "sharding", None), "spec", None)),
               getattr(getattr(getattr(x, "sharding", None), "mesh", None), "shape_tuple", None))
              for x in jax.tree_util.tree_leaves(tree)])


def with_sharding_of(y: Any, x: Any) -> Any:
  """``y`` (specs) with ``x``'s shardings where ``y`` has none and the structures match."""
  ly, ty = jax.tree_util.tree_flatten(y)
  lx, tx = jax.tree_util.tree_flatten(x)
  if ty != tx:
    return y
  out = []
  for a, b in zip(ly, lx, strict=True):
    if (getattr(a, "sharding", None) is None and isinstance(getattr(b, "sharding", None), NamedSharding)
        and a.shape == b.shape):
      a = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=b.sharding)
    elif isinstance(getattr(a, "sharding", None), NamedSharding):
      a = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(_concrete(a.sharding.mesh),
                                                                        a.sharding.spec))
    out.append(a)
  return jax.tree_util.tree_unflatten(ty, out)


def _explicit(mesh) -> bool:
  types = getattr(mesh, "axis_types", ())
  return bool(types) and all("Explicit" in str(t) for t in types)


def _concrete(mesh) -> jax.sharding.Mesh:
  if isinstance(mesh, jax.sharding.Mesh):
    return mesh
  devices = np.array(jax.devices()[:mesh.size]).reshape(mesh.axis_sizes)
  return jax.sharding.Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)


def _itemsize(dtype) -> int:
  try:
    return int(np.dtype(dtype).itemsize)
  except TypeError:  # extended dtypes (PRNG keys): their key data
    return 8


def is_key(x) -> bool:
  """Whether ``x`` is a typed PRNG key array (``jax.random.key``)."""
  return hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)
