"""remat.offload: exact gradients, GPU lowering moves activations (not parameters), honest CPU.

XLA:CPU drops memory-kind moves (docs/facts.md, fact 5), so the placement is checked
in the module lowered for GPU with ``jax.export`` and the numerics on CPU.
"""

import dataclasses
import functools
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import remat
from remat._src.core import offload as offload_lib
from lowering import cuda_placements

B, H, DEPTH = 32, 16, 4  # activations are (B, H), parameters (H, H): told apart by shape
ACT, PARAM = f"tensor<{B}x{H}xf32>", f"tensor<{H}x{H}xf32>"

jit_modes = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


@pytest.fixture(autouse=True)
def _quiet_cpu_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    yield


def layer(w, x):
  return jnp.tanh(jnp.tanh(x @ w) @ w)


def make(dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(0), DEPTH + 1)
  ws = [(jax.random.normal(k, (H, H)) / 4).astype(dtype) for k in ks[:DEPTH]]
  return ws, jax.random.normal(ks[-1], (B, H)).astype(dtype)


def chain_loss(ws, x, **ck):
  for w in ws:
    x = (remat.checkpoint(layer, **ck) if ck is not None else layer)(w, x)
  return jnp.sum(x.astype(jnp.float32) ** 2)


def closure_loss(ws, x, **ck):
  """Parameters reach the block by closure: closed-over values never move."""
  for w in ws:
    x = remat.checkpoint(lambda x, w=w: layer(w, x), **ck)(x)
  return jnp.sum(x ** 2)


def step(loss, **ck):
  return jax.value_and_grad(functools.partial(loss, **ck), argnums=(0, 1))


ACT_ONLY = remat.offload.host(argnums=1, min_bytes=0)
DOTS = jax.checkpoint_policies.dots_saveable


@functools.lru_cache(maxsize=None)
def gpu_placements(kind: str) -> tuple[tuple[str, str], ...]:
  """(memory kind, tensor type) of every placement in the step lowered for CUDA."""
  configs = {
      "argnums": (chain_loss, dict(offload=ACT_ONLY)),
      "all_args": (chain_loss, dict(offload=remat.offload.host(min_bytes=0))),
      "exclude": (chain_loss, dict(offload=remat.offload.host(exclude_argnums=0, min_bytes=0))),
      "closure": (closure_loss, dict(offload=remat.offload.host(min_bytes=0))),
      "policy": (chain_loss, dict(offload=ACT_ONLY, policy=DOTS)),
      "small": (chain_loss, dict(offload=remat.offload.host(argnums=1))),  # 2 KiB < 64 KiB
      "none": (chain_loss, {}),
  }
  loss, ck = configs[kind]
  ws, x = make()
  return tuple(cuda_placements(step(loss, **ck), ws, x))


# -- Numerics ------------------------------------------------------------------


@jit_modes
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("policy", [None, DOTS], ids=["inputs", "dots_saveable"])
def test_offload_gradients_are_exact(use_jit, dtype, policy):
  ws, x = make(dtype)
  wrap = jax.jit if use_jit else (lambda f: f)
  ours = wrap(step(chain_loss, offload=ACT_ONLY, policy=policy))(ws, x)
  same_plan = wrap(step(chain_loss, policy=policy))(ws, x)
  plain = wrap(jax.value_and_grad(lambda ws, x: chain_loss(ws, x, **{}), argnums=(0, 1)))
  # Against the same checkpointing without offload: bit for bit.
  chex.assert_trees_all_equal(ours, same_plan)
  # Against plain backprop and jax.checkpoint: to rounding.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  chex.assert_trees_all_close(ours, plain(ws, x), atol=tol, rtol=tol)
  jck = wrap(jax.value_and_grad(
      lambda ws, x: _jax_chain(ws, x, policy), argnums=(0, 1)))(ws, x)
  chex.assert_trees_all_close(ours, jck, atol=tol, rtol=tol)


def _jax_chain(ws, x, policy):
  for w in ws:
    x = jax.checkpoint(layer, policy=policy)(w, x)
  return jnp.sum(x.astype(jnp.float32) ** 2)


def test_keys_ints_and_keywords_pass_through():
  def block(w, x, key, *, scale, n):
    keep = jax.random.bernoulli(key, 0.8, x.shape)
    return jnp.where(keep, jnp.tanh(x @ w) * scale, 0.0) * n

  ws, x = make()
  key, n = jax.random.key(3), jnp.int32(2)
  pol = remat.offload.host(min_bytes=0)

  def loss(w, x, scale, wrap):
    return wrap(block)(w, x, key, scale=scale, n=n).sum()

  ck = lambda f: remat.checkpoint(f, offload=pol)
  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(ws[0], x, jnp.float32(1.5), ck)
  want = jax.grad(loss, argnums=(0, 1, 2))(ws[0], x, jnp.float32(1.5), lambda f: f)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_nested_checkpoints_with_offload():
  ws, x = make()
  inner = remat.checkpoint(layer)

  def segment(w0, w1, x):
    return inner(w1, inner(w0, x))

  def loss(ws, x):
    for i in range(0, DEPTH, 2):
      x = remat.checkpoint(segment, offload=remat.offload.host(argnums=2, min_bytes=0))(ws[i], ws[i + 1], x)
    return jnp.sum(x ** 2)

  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(ws, x)
  want = jax.grad(lambda ws, x: chain_loss(ws, x, **{}), argnums=(0, 1))(ws, x)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_composes_with_a_jax_offload_policy():
  """Values jax's own policy already put on host are neither moved twice nor brought back by us."""
  ws, x = make()
  jpol = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  got = jax.jit(step(chain_loss, policy=jpol, offload=ACT_ONLY))(ws, x)
  want = jax.value_and_grad(lambda ws, x: chain_loss(ws, x, **{}), argnums=(0, 1))(ws, x)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_cpu_memory_is_unchanged_and_residuals_are_listed_on_host():
  """On CPU nothing moves: the compiled step is the no-offload one; the jaxpr residuals say host."""
  ws, x = make()
  with_offload = remat.profile(step(chain_loss, offload=ACT_ONLY), ws, x)
  without = remat.profile(step(chain_loss), ws, x)
  assert with_offload.temp_bytes == without.temp_bytes
  assert with_offload.host_temp_bytes == 0
  res = remat.saved_residuals(remat.checkpoint(layer, offload=ACT_ONLY), ws[0], x)
  kinds = sorted((r.shape, r.memory_kind) for r in res)
  assert kinds == [((H, H), "device"), ((B, H), "host")], kinds


# -- Placement in the GPU program ------------------------------------------------


def test_gpu_lowering_moves_activations_not_parameters():
  placed = gpu_placements("argnums")
  assert placed.count(("pinned_host", ACT)) == DEPTH  # one block input per checkpoint
  assert placed.count(("device", ACT)) == DEPTH  # and each brought back
  assert all(t == ACT for _, t in placed), placed


def test_gpu_lowering_excluded_parameters_never_move():
  assert gpu_placements("exclude") == gpu_placements("argnums")


def test_gpu_lowering_closed_over_parameters_never_move():
  placed = gpu_placements("closure")
  assert sorted(set(placed)) == [("device", ACT), ("pinned_host", ACT)]
  assert len(placed) == 2 * DEPTH


def test_gpu_lowering_argnums_none_moves_every_argument():
  placed = gpu_placements("all_args")
  assert placed.count(("pinned_host", PARAM)) == DEPTH
  assert placed.count(("pinned_host", ACT)) == DEPTH


def test_gpu_lowering_with_policy_moves_saved_intermediates():
  # dots_saveable keeps both dot outputs of each layer; with the block input: 3 per layer.
  placed = gpu_placements("policy")
  assert placed.count(("pinned_host", ACT)) == 3 * DEPTH
  assert placed.count(("device", ACT)) == 3 * DEPTH
  assert ("pinned_host", PARAM) not in placed


def test_gpu_lowering_min_bytes_and_no_offload():
  assert gpu_placements("small") == ()  # 2 KiB activations are below the 64 KiB default
  assert gpu_placements("none") == ()


def test_cpu_lowering_drops_placements_and_warns_once(monkeypatch):
  monkeypatch.setattr(offload_lib, "_WARNED", set())
  ws, x = make()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    txt = jax.jit(step(chain_loss, offload=ACT_ONLY)).lower(ws, x).as_text()
    jax.jit(step(closure_loss, offload=ACT_ONLY)).lower(ws, x).as_text()
  ours = [w for w in caught if issubclass(w.category, remat.offload.OffloadNotExecutedWarning)]
  assert len(ours) == 1, [str(w.message) for w in caught]
  msg = str(ours[0].message)
  assert "`remat.offload.host`" in msg and "'cpu'" in msg and "exact" in msg
  assert "annotate_device_placement" not in txt


# -- The policy object -------------------------------------------------------------


def test_supported():
  # The answer follows the backend the tests run on: XLA:CPU drops the moves, GPU/TPU execute them.
  executes = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
  assert remat.offload.supported() is executes
  assert remat.offload.supported(jax.devices()[0]) is executes
  assert remat.offload.supported("cuda") and remat.offload.supported("tpu")
  assert not remat.offload.supported("cpu")
  with pytest.raises(TypeError, match="remat.offload.supported"):
    remat.offload.supported(3)


def test_policy_is_frozen_hashable_with_a_link_model():
  a = remat.offload.host(argnums=(2, 1, 1), bandwidth=1e9, latency=0.0)
  assert a == remat.offload.host(argnums=[1, 2], bandwidth=1e9, latency=0.0)
  assert a.argnums == (1, 2) and hash(a) == hash(remat.offload.host(argnums=(1, 2), bandwidth=1e9, latency=0))
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.min_bytes = 3
  assert a.link == remat.offload.HostLink(bandwidth=1e9, latency=0.0)
  assert a.link.transfer_seconds(5e8) == pytest.approx(0.5)
  assert a.link.transfer_seconds(0) == 0.0
  # 0.5 s each way at 1 GB/s, behind 5e13 flops (0.25 s on a "gpu") each way: 2 x 0.25 s exposed.
  assert a.link.exposed_seconds(5e8, 5e13, backend="gpu") == pytest.approx(0.5)
  assert a.link.exposed_seconds(5e8, 1e14, backend="gpu") == 0.0
  d = remat.offload.host()
  assert d.link.link_bandwidth("cuda") == remat.offload.DEFAULT_BANDWIDTH["gpu"]
  assert d.link.link_bandwidth("tpu") == remat.offload.DEFAULT_BANDWIDTH["tpu"]
  assert d.link.transfer_seconds(1 << 30, backend="gpu") == pytest.approx(
      remat.offload.DEFAULT_LATENCY_S + (1 << 30) / 50e9)
  with pytest.raises(ValueError, match="bandwidth.*`remat.offload.host`"):
    remat.offload.host(bandwidth=-1.0)
  with pytest.raises(ValueError, match="latency.*`remat.offload.HostLink`.*nan"):
    remat.offload.HostLink(latency=float("nan"))
  assert not d.worth_moving(1024) and d.worth_moving(1 << 20)
  assert a.moves_input(1) and not a.moves_input(0) and not a.moves_input(None)
  assert not a.moves_input("x") and d.moves_input("x")
  e = remat.offload.host(argnums=(1, 2), exclude_argnums=2)
  assert e.moves_input(1) and not e.moves_input(2)
  # Adapters that prepend (variables, rngs) shift the user's positions and pin the new ones.
  shifted = e.with_leading_arguments(2)
  assert shifted.argnums == (3, 4) and shifted.exclude_argnums == (0, 1, 4)
  assert [shifted.moves_input(i) for i in range(5)] == [False, False, False, True, False]
  assert not d.with_leading_arguments(2).moves_input(1) and d.with_leading_arguments(2).moves_input(2)
  # Usable as a static argument of jax.jit.
  f = jax.jit(lambda x, p: x * p.min_bytes, static_argnums=1)
  assert float(f(jnp.float32(2), remat.offload.host(min_bytes=3))) == 6.0


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(argnums=-1), TypeError, "`argnums`"),
    (dict(argnums="x"), TypeError, "`argnums`"),
    (dict(exclude_argnums=None), TypeError, "`exclude_argnums`"),
    (dict(exclude_argnums=(-2,)), TypeError, "`exclude_argnums`"),
    (dict(min_bytes=-1), TypeError, "`min_bytes`"),
    (dict(min_bytes=1.5), TypeError, "`min_bytes`"),
    (dict(bandwidth=0), ValueError, "`bandwidth`"),
    (dict(bandwidth=float("inf")), ValueError, "`bandwidth`"),
    (dict(latency=-1.0), ValueError, "`latency`"),
])
def test_bad_arguments_are_rejected_at_construction(kwargs, exc, text):
  with pytest.raises(exc, match=re.escape(text)) as info:
    remat.offload.host(**kwargs)
  assert "`remat.offload.host`" in str(info.value)


@pytest.mark.parametrize("bad, hint", [
    ("pinned_host", "chosen by the policy"),
    (remat.offload.host, "call it"),
    (jax.memory.Space.Host, "remat.offload.host()"),
])
def test_checkpoint_rejects_a_non_policy(bad, hint):
  with pytest.raises(TypeError, match=re.escape("`remat.checkpoint`")) as info:
    remat.checkpoint(layer, offload=bad)
  assert hint in str(info.value) and repr(bad) in str(info.value)


def test_to_device_rejects_foreign_residuals():
  with pytest.raises(TypeError, match="to_host"):
    remat.offload.host().to_device((np.ones(3),))


def test_offload_inside_lax_scan():
  """A checkpointed, offloaded layer as a scan body: exact, one move each way in the loop bodies."""
  ws = jnp.stack(make()[0])
  x = make()[1]
  ck = remat.checkpoint(layer, offload=ACT_ONLY)

  def loss(ws, x, f):
    x, _ = jax.lax.scan(lambda x, w: (f(w, x), None), x, ws)
    return jnp.sum(x ** 2)

  step_fn = jax.jit(jax.grad(loss), static_argnums=2)
  chex.assert_trees_all_close(step_fn(ws, x, ck), jax.grad(loss)(ws, x, layer), atol=1e-5, rtol=1e-5)
  assert cuda_placements(functools.partial(jax.grad(loss), f=ck), ws, x) == [("pinned_host", ACT),
                                                                            ("device", ACT)]
