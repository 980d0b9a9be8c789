"""remat.fit and budget per device on meshes of 8 host devices (data parallel and FSDP, Auto and
Explicit axes): memory is the partitioned program's, per device."""

import chex
import jax
import jax.numpy as jnp
import pytest
from test_fit import D, args, plain_plan, sgd_step, tanh_layer

import remat
from remat import segmenters as S

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (see conftest.py)")
MB, MW = 8192, 128  # batch and width: activations dominate the replicated or sharded parameters


def mesh_setup(kind, axis_type):
  from jax.sharding import NamedSharding, PartitionSpec as P
  if kind == "dp":
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    x_spec, w_spec = P("data", None), P()
  else:  # data x FSDP: the batch over both axes, the weights' first axis over "fsdp"
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    x_spec, w_spec = P(("data", "fsdp"), None), P("fsdp", None)
  xs, wss = NamedSharding(mesh, x_spec), NamedSharding(mesh, w_spec)
  ws, x = args(batch=MB, width=MW)
  kw = dict(donate_argnums=0, in_shardings=([wss] * D, xs),
            out_shardings=([wss] * D, NamedSharding(mesh, P())))
  return jax.device_put(ws, wss), jax.device_put(x, xs), kw


@needs8
@pytest.mark.parametrize("kind,axis", [("dp", "Auto"), ("fsdp", "Auto"), ("fsdp", "Explicit")])
def test_fit_is_per_device_on_a_mesh(kind, axis):
  ws, x, kw = mesh_setup(kind, getattr(jax.sharding.AxisType, axis))
  plain = remat.profile(remat.jit(sgd_step(plain_plan(D)), **kw), ws, x)
  sqrt = remat.profile(remat.jit(sgd_step(S.sqrt()), **kw), ws, x)
  act = MB * MW * 4 // 8  # one activation's shard
  assert plain.temp_bytes < 24 * act  # per device: the global batch would need 8x more
  fitted = remat.fit(sgd_step(S.auto()), sqrt.peak_bytes, **kw)
  report = fitted.plans(ws, x)
  assert report.profile.peak_bytes <= sqrt.peak_bytes < plain.peak_bytes
  assert report.profile.flops <= sqrt.flops * (1 + 1e-6)
  got = fitted(ws, x)
  want = remat.jit(sgd_step(plain_plan(D)))(*args(batch=MB, width=MW))
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@needs8
def test_budget_is_per_device_under_explicit_sharding_data_parallel():
  """16 tanh layers, a 4096 x 256 batch over 8 devices: plain backprop needs 8.5 MiB of temp per device
  (17 activation shards), and budget(8 MiB) is a per-device budget that it meets."""
  from jax.sharding import AxisType
  ws, x, _ = mesh_setup("dp", AxisType.Explicit)
  ws = [jax.device_put(jnp.eye(256) * 0.5, w.sharding) for w in ws]
  x = jax.device_put(jnp.ones((4096, 256)), x.sharding)
  apply = remat.sequential([tanh_layer] * D, S.budget(8 * 2**20))
  plan = apply.plan_for(ws, x)
  assert plan.compiled_temp_bytes <= 8 * 2**20
  assert abs(plan.predicted_peak_bytes - plan.compiled_temp_bytes) <= 0.1 * plan.compiled_temp_bytes
  step = remat.jit(jax.value_and_grad(lambda ws, x: jnp.mean(apply(ws, x) ** 2)))
  assert remat.profile(step, ws, x).temp_bytes <= 8.5 * 2**20


@needs8
def test_budget_is_per_device_under_explicit_sharding_fsdp():
  from jax.sharding import AxisType
  ws, x, _ = mesh_setup("fsdp", AxisType.Explicit)
  plain = remat.sequential([tanh_layer] * D, plain_plan(D)).plan_for(ws, x, compile=True)
  uniform = remat.sequential([tanh_layer] * D, S.every(4)).plan_for(ws, x, compile=True)
  act = MB * MW * 4 // 8
  assert plain.compiled_temp_bytes < 24 * act  # per device
  assert abs(uniform.predicted_peak_bytes - uniform.compiled_temp_bytes) <= 0.1 * uniform.compiled_temp_bytes
  plan = remat.sequential([tanh_layer] * D, S.budget(uniform.compiled_temp_bytes)).plan_for(ws, x)
  assert plan.compiled_temp_bytes <= uniform.compiled_temp_bytes
  assert plan.predicted_flops <= uniform.predicted_flops


@needs8
def test_budget_under_an_auto_mesh_warns_that_it_plans_global_shapes():
  from jax.sharding import AxisType
  ws, x, kw = mesh_setup("dp", AxisType.Auto)
  apply = remat.sequential([tanh_layer] * D, S.budget(64 * 2**20))
  step = remat.jit(jax.grad(lambda ws, x: jnp.mean(apply(ws, x) ** 2)), in_shardings=kw["in_shardings"])
  with pytest.warns(S.GlobalShapesWarning, match=r"global shapes.*remat.fit"):
    step.lower(ws, x)


