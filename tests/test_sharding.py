"""Checkpointing and host offload under `jax.sharding` meshes (8 host CPU devices).

Data parallel (batch sharded, parameters replicated) and FSDP-style (batch
sharded, parameters sharded along their first axis and gathered by the
partitioner) steps must give the single-device gradients, with and without
offload; offloaded residuals keep their sharding.
"""

import functools
import re
import warnings

import chex
import jax
import jax.extend
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import remat

B, H, DEPTH = 64, 32, 4
DOTS = jax.checkpoint_policies.dots_saveable

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (see conftest.py)")


@pytest.fixture(autouse=True)
def _quiet_cpu_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    yield


def layer(w, x):
  return jnp.tanh(jnp.tanh(x @ w["a"]) @ w["b"] + w["c"])


def make():
  ks = jax.random.split(jax.random.key(0), 3 * DEPTH + 1)
  ws = [{"a": jax.random.normal(ks[3 * i], (H, H)) / 5,
         "b": jax.random.normal(ks[3 * i + 1], (H, H)) / 5,
         "c": jax.random.normal(ks[3 * i + 2], (H,)) / 5} for i in range(DEPTH)]
  return ws, jax.random.normal(ks[-1], (B, H))


CONFIGS = {
    "plain": None,
    "checkpoint": dict(),
    "offload": dict(offload=remat.offload.host(argnums=1, min_bytes=0)),
    "policy_offload": dict(policy=DOTS, offload=remat.offload.host(argnums=1, min_bytes=0)),
}


def loss(ws, x, config):
  ck = CONFIGS[config]
  for w in ws:
    x = layer(w, x) if ck is None else remat.checkpoint(layer, **ck)(w, x)
  return jnp.mean(x ** 2)


def grad_fn(config):
  return jax.value_and_grad(functools.partial(loss, config=config), argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def single_device():
  ws, x = make()
  dev = jax.devices()[0]
  ws, x = jax.device_put((ws, x), dev)
  return jax.jit(grad_fn("plain"))(ws, x)


def mesh_and_shardings(kind, axis_type=AxisType.Auto):
  if kind == "dp":
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    batch = P("data")
    param = lambda leaf: P()
  else:  # fsdp: batch over both axes, parameters' first axis over "fsdp"
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    batch = P(("data", "fsdp"))
    param = lambda leaf: P("fsdp", *([None] * (leaf.ndim - 1)))
  ws, x = make()
  w_sh = jax.tree_util.tree_map(lambda l: NamedSharding(mesh, param(l)), ws)
  return mesh, w_sh, NamedSharding(mesh, batch)


@functools.lru_cache(maxsize=None)
def sharded_step(kind, config):
  mesh, w_sh, x_sh = mesh_and_shardings(kind)
  return jax.jit(grad_fn(config), in_shardings=(w_sh, x_sh),
                 out_shardings=(NamedSharding(mesh, P()), (w_sh, x_sh)),
                 compiler_options=remat.compiler_options())


def sharded_args(kind):
  _, w_sh, x_sh = mesh_and_shardings(kind)
  ws, x = make()
  return jax.device_put(ws, w_sh), jax.device_put(x, x_sh)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", ["dp", "fsdp"])
def test_sharded_gradients_equal_single_device(kind, config):
  ws, x = sharded_args(kind)
  got = sharded_step(kind, config)(ws, x)
  chex.assert_trees_all_close(got, single_device(), atol=1e-5, rtol=1e-5)
  # Gradients come back sharded like the parameters and the batch.
  _, w_sh, x_sh = mesh_and_shardings(kind)
  for g, s in zip(jax.tree_util.tree_leaves(got[1][0]), jax.tree_util.tree_leaves(w_sh), strict=True):
    assert g.sharding.is_equivalent_to(s, g.ndim)
  assert got[1][1].sharding.is_equivalent_to(x_sh, 2)


@pytest.mark.parametrize("kind", ["dp", "fsdp"])
def test_recomputation_survives_partitioning(kind):
  """Each device runs every forward matmul twice with checkpointing, once without."""
  ws, x = sharded_args(kind)
  fwd = lambda cfg: remat.profile(sharded_step(kind, cfg), ws, x).forward_dots()
  assert fwd("plain") == 2 * DEPTH
  assert fwd("checkpoint") == 4 * DEPTH
  assert fwd("offload") == 4 * DEPTH
  # dots_saveable keeps the matmul outputs: nothing to recompute.
  assert fwd("policy_offload") == 2 * DEPTH


def test_offloaded_residuals_keep_their_sharding():
  """With explicit mesh axes the residual types carry shardings: host copies keep the batch split."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  ws, x = make()
  ws = jax.device_put(ws, NamedSharding(mesh, P()))
  x = jax.device_put(x, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(grad_fn("policy_offload"))(ws, x)
    got = jax.jit(grad_fn("policy_offload"))(ws, x)
  host_avals = _device_put_avals(jaxpr.jaxpr, jax.memory.Space.Host)
  # Per layer: the block input and the two matmul outputs, all (B, H).
  assert len(host_avals) == 3 * DEPTH
  for aval in host_avals:
    assert aval.shape == (B, H) and aval.sharding.spec == P("data", None), aval
  back = _device_put_avals(jaxpr.jaxpr, jax.memory.Space.Device)
  assert len(back) == 3 * DEPTH and all(a.sharding.spec == P("data", None) for a in back)
  chex.assert_trees_all_close(got, single_device(), atol=1e-5, rtol=1e-5)


def _device_put_avals(jaxpr, space):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "device_put" and eqn.params["devices"][0] == space:
      found.extend(v.aval for v in eqn.outvars)
    for sub in _subjaxprs(eqn.params):
      found.extend(_device_put_avals(sub, space))
  return found


def _subjaxprs(params):
  for v in params.values():
    vs = v if isinstance(v, (tuple, list)) else (v,)
    for u in vs:
      if isinstance(u, jax.extend.core.ClosedJaxpr):
        yield u.jaxpr
      elif isinstance(u, jax.extend.core.Jaxpr):
        yield u


@pytest.mark.parametrize("kind", ["dp", "fsdp"])
def test_sharded_gpu_lowering_moves_activations(kind):
  """Lowered for 8 GPUs, the sharded step moves each block input to pinned_host and back."""
  ws, x = sharded_args(kind)
  exp = jax.export.export(sharded_step(kind, "offload"), platforms=["cuda"])(ws, x)
  assert exp.nr_devices == 8
  # The batch argument stays split over "data" (Shardy annotation of the exported main).
  text = exp.mlir_module()
  assert re.search(rf'tensor<{B}x{H}xf32> {{[^}}]*sdy.sharding = #sdy.sharding<@mesh, \[{{"data"', text)
  placed = remat.offload.placements(sharded_step(kind, "offload"), ws, x)
  to_host = {res: t for res, _, kind_, t in placed if kind_ == "pinned_host"}
  # (jax also marks the step's outputs "device" because out_shardings are given.)
  back = [t for _, src, kind_, t in placed if kind_ == "device" and src in to_host]
  act = f"tensor<{B}x{H}xf32>"
  assert sorted(to_host.values()) == [act] * DEPTH
  assert back == [act] * DEPTH
