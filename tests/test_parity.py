"""remat.checkpoint against jax.checkpoint where their users meet: forward mode, prevent_cse, traces."""

import os
import re
import traceback
import warnings

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

import remat

jit_modes = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def maybe_jit(f, use_jit, **kwargs):
  return jax.jit(f, **kwargs) if use_jit else f


def mlp(w, x):
  return jnp.tanh(jnp.tanh(x @ w["a"]) @ w["b"])


def params(h=8):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"a": jax.random.normal(k1, (h, h)) / 3, "b": jax.random.normal(k2, (h, h)) / 3}


X = jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)


def close(a, b, tol=1e-5):
  chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


# -- forward mode ---------------------------------------------------------------

@jit_modes
def test_jvp_linearize_and_jacfwd_match_jax_checkpoint(use_jit):
  w = params()
  ours, ref = remat.checkpoint(mlp), jax.checkpoint(mlp)
  jvp = maybe_jit(lambda f, w, x: jax.jvp(f, (w, x), (w, x)), use_jit, static_argnums=0)
  close(jvp(ours, w, X), jvp(ref, w, X), tol=1e-6)

  def linearized(f, w, x):
    y, lin = jax.linearize(f, w, x)
    return y, lin(w, x), lin(w, 2 * x)

  close(maybe_jit(linearized, use_jit, static_argnums=0)(ours, w, X), linearized(ref, w, X), tol=1e-6)
  jac = maybe_jit(lambda f, w, x: jax.jacfwd(f, argnums=(0, 1))(w, x), use_jit, static_argnums=0)
  close(jac(ours, w, X), jac(ref, w, X), tol=1e-6)


def test_check_grads_forward_mode():
  f = remat.checkpoint(lambda x: jnp.sin(x) * jnp.cos(2 * x))
  x = jnp.linspace(-1.0, 1.0, 5)
  jax.test_util.check_grads(f, (x,), order=1, modes=["fwd"])
  with jax.enable_x64(True):  # second order needs the precision, for jax.checkpoint too
    jax.test_util.check_grads(f, (x.astype(jnp.float64),), order=2, modes=["fwd", "rev"])


@jit_modes
def test_forward_mode_through_while_loop_and_scan(use_jit):
  def loop(wrap, x):
    def body(c):
      i, h = c
      return i + 1, wrap(lambda h: jnp.sin(h) * 1.1)(h)
    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

  def scanned(wrap, ws, x):
    return jax.lax.scan(lambda h, w: (wrap(lambda w, h: jnp.tanh(h @ w))(w, h), None), x, ws)[0]

  for f, args in [(loop, (X,)), (scanned, (jnp.stack([params()["a"]] * 3), X))]:
    got = maybe_jit(lambda *a, f=f: jax.jvp(lambda *p: f(remat.checkpoint, *p), a, a), use_jit)(*args)
    close(got, jax.jvp(lambda *p, f=f: f(jax.checkpoint, *p), args, args))
  y, lin = jax.linearize(lambda ws, x: scanned(remat.checkpoint, ws, x), jnp.stack([params()["b"]] * 2), X)
  _, lin0 = jax.linearize(lambda ws, x: scanned(lambda f: f, ws, x), jnp.stack([params()["b"]] * 2), X)
  close(lin(jnp.ones((2, 8, 8)), X), lin0(jnp.ones((2, 8, 8)), X))
  # The linear function also batches.
  close(jax.vmap(lambda t: lin(jnp.ones((2, 8, 8)), t))(jnp.stack([X, -X])),
        jax.vmap(lambda t: lin0(jnp.ones((2, 8, 8)), t))(jnp.stack([X, -X])))


@pytest.mark.parametrize("kind", ["dots", "names", "offload"])
def test_forward_mode_with_policy_and_offload(kind):
  def block(w, x):
    h = checkpoint_name(x @ w["a"], "proj")
    return jnp.tanh(jnp.tanh(h) @ w["b"])

  opts = {"dots": dict(policy=jax.checkpoint_policies.dots_saveable),
          "names": dict(policy=jax.checkpoint_policies.save_only_these_names("proj")),
          "offload": dict(offload=remat.offload.host(argnums=1, min_bytes=0))}[kind]
  f, w = remat.checkpoint(block, **opts), params()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # offload on CPU warns that nothing moves
    close(jax.jvp(f, (w, X), (w, X)), jax.jvp(block, (w, X), (w, X)))
    close(jax.jacfwd(f, argnums=1)(w, X), jax.jacfwd(block, argnums=1)(w, X))
    close(jax.grad(lambda w: f(w, X).sum())(w), jax.grad(lambda w: block(w, X).sum())(w))


def test_higher_order_in_every_direction_and_non_float_outputs():
  inner = remat.checkpoint(lambda h: jnp.sin(h) * jnp.cos(h))
  nested = remat.checkpoint(lambda h: inner(inner(h)) ** 2)
  plain = lambda h: (jnp.sin(jnp.sin(h) * jnp.cos(h)) * jnp.cos(jnp.sin(h) * jnp.cos(h))) ** 2  # noqa: E731
  v = jnp.linspace(0.1, 1.0, 5)
  loss, loss0 = (lambda v: nested(v).sum()), (lambda v: plain(v).sum())
  for outer in (jax.jacfwd, jax.jacrev):
    for inner_t in (jax.jacfwd, jax.grad):
      close(outer(inner_t(loss))(v), outer(inner_t(loss0))(v), tol=1e-4)
  # Integer, key and None outputs get no tangent; integer inputs take float0 tangents.
  def f(x, n, key):
    return {"y": jnp.sin(x) * n, "n": n + 1, "key": key, "none": None}

  n, key = jnp.int32(3), jax.random.key(0)
  t0 = np.zeros((), jax.dtypes.float0)
  out, tan = jax.jvp(remat.checkpoint(f), (v, n, key), (v, t0, np.zeros((), jax.dtypes.float0)))
  ref_out, ref_tan = jax.jvp(jax.checkpoint(f), (v, n, key), (v, t0, np.zeros((), jax.dtypes.float0)))
  close(tan["y"], ref_tan["y"])
  assert out["n"] == 4 and tan["n"].dtype == jax.dtypes.float0 and out["none"] is None


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.everything_saveable],
                         ids=["nothing_saved", "everything_saved"])
def test_inside_jax_checkpoint_both_modes(policy):
  f = lambda x: jnp.sin(jnp.sin(x)) * x  # noqa: E731
  g = jax.checkpoint(lambda x: remat.checkpoint(f)(x) ** 2, policy=policy)
  g0 = lambda x: f(x) ** 2  # noqa: E731
  x = jnp.linspace(0.0, 1.0, 5)
  close(jax.jit(jax.grad(lambda x: g(x).sum()))(x), jax.grad(lambda x: g0(x).sum())(x), tol=1e-6)
  close(jax.jvp(g, (x,), (x,)), jax.jvp(g0, (x,), (x,)), tol=1e-6)
  close(jax.linearize(g, x)[1](x), jax.jvp(g0, (x,), (x,))[1], tol=1e-6)


def test_jvp_compiles_to_the_same_program_as_jax_checkpoint():
  # Forward mode costs what jax.checkpoint's does: no extra evaluations survive compilation.
  ws = [jax.ShapeDtypeStruct((32, 32), jnp.float32)] * 8
  x = jax.ShapeDtypeStruct((16, 32), jnp.float32)

  def segment(ws, x):
    for w in ws:
      x = jnp.tanh(x @ w)
    return x

  def run(wrap):
    def f(ws, x):
      for i in range(0, 8, 4):
        x = wrap(segment)(ws[i:i + 4], x)
      return x
    return lambda ws, x: jax.jvp(f, (ws, x), (ws, x))

  ours, ref = remat.profile(run(remat.checkpoint), ws, x), remat.profile(run(jax.checkpoint), ws, x)
  assert ours.count_dots() == ref.count_dots()
  assert ours.flops == ref.flops and ours.temp_bytes == ref.temp_bytes


# -- prevent_cse ----------------------------------------------------------------

def _compiled_barrier_operands(step, *args) -> list[str]:
  """The operand shapes of every opt-barrier in the optimized HLO (compiled as remat.jit does)."""
  found = []
  for line in remat.profile(step, *args).hlo.splitlines():
    if "opt-barrier(" in line:
      found.append(sorted(re.findall(r"f32\[[\d,]*\]", line.split("opt-barrier(")[0])))
  return found


@pytest.mark.parametrize("prevent_cse, kept", [
    (True, ["f32[3,8]", "f32[8,8]", "f32[8,8]", "f32[8]"]),
    (False, None),
    ((True, False), ["f32[8,8]", "f32[8,8]", "f32[8]"]),  # x left out of the barrier
    ((False, True), ["f32[3,8]", "f32[8]"]),
    ([{"a": False, "b": True}, True], ["f32[3,8]", "f32[8,8]", "f32[8]"]),  # a pytree prefix
    ((False, False), ["f32[8]"]),  # the cotangent always goes through, as in jax
])
def test_prevent_cse_per_argument_matches_jax_in_the_compiled_hlo(prevent_cse, kept):
  def f(w, x):  # output (8,), so the cotangent is told apart from x (3, 8)
    return jnp.tanh(jnp.tanh(x @ w["a"]) @ w["b"]).sum(0)

  def step(wrap):
    g = wrap(f, prevent_cse=prevent_cse)
    return jax.grad(lambda w, x: g(w, x).sum(), argnums=(0, 1))

  w, x = params(), jnp.ones((3, 8))
  got, ref = (_compiled_barrier_operands(step(wrap), w, x) for wrap in (remat.checkpoint, jax.checkpoint))
  assert got == ref == ([] if kept is None else [kept])


def test_prevent_cse_counts_dynamic_arguments_and_leaves_closures_out():
  c = jnp.ones((5, 8))  # closed over and traced: never in the barrier of a tuple prevent_cse

  def f(x, n, w):
    return (jnp.tanh(x @ w) * n).sum(0) + c.sum(0)

  def step(x, w, c, wrap, cse):
    g = wrap(lambda x, n, w: f(x, n, w) * c[0], static_argnums=(1,), prevent_cse=cse)
    return jax.grad(lambda x, w: g(x, 2, w).sum(), argnums=(0, 1))(x, w)

  x, w = jnp.ones((3, 8)), jnp.ones((8, 8))
  for wrap in (remat.checkpoint, jax.checkpoint):
    ops = _compiled_barrier_operands(lambda x, w, c, wrap=wrap: step(x, w, c, wrap, (False, True)),
                                     x, w, c)
    assert ops == [["f32[8,8]", "f32[8]"]]  # w and the cotangent; not x, not c


def test_prevent_cse_errors_name_the_api_and_the_fix():
  with pytest.raises(TypeError, match=r"`prevent_cse`.*`remat.checkpoint`.*'yes'.*prevent_cse=\(False"):
    remat.checkpoint(mlp, prevent_cse="yes")
  with pytest.raises(TypeError, match=r"`prevent_cse`.*\(True, 1\)"):
    remat.checkpoint(mlp, prevent_cse=(True, 1))
  f = remat.checkpoint(mlp, prevent_cse=(True, False, True))
  with pytest.raises(ValueError, match=r"pytree prefix.*'mlp'.*2 dynamic positional"):
    f(params(), X)


# -- trace cache ----------------------------------------------------------------

def _counted(**options):
  calls = []

  def f(x, w, n=1):
    calls.append(None)
    return jnp.tanh(x @ w) * n

  return remat.checkpoint(f, **options), calls


def test_eager_calls_trace_once_per_input_types_and_static_values():
  w = params()["a"]
  f, calls = _counted(static_argnums=(2,))
  for _ in range(10):
    f(X, w, 1)
  assert len(calls) == 1
  for _ in range(3):  # differentiating reuses the trace: no extra trace for the backward pass
    jax.grad(lambda w: f(X, w, 1).sum())(w)
  jax.jvp(lambda w: f(X, w, 1), (w,), (w,))
  jax.jit(lambda x, w: f(x, w, 1) + f(x, w, 1))(X, w)
  jax.vmap(lambda x: f(x, w, 1))(jnp.stack([X, X]))
  assert len(calls) == 1
  f(X, w, 2)  # a new static value
  f(X.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 2)  # new dtypes
  f(X[:2], w, 2)  # a new shape
  assert len(calls) == 4
  f(X, w, 2)
  assert len(calls) == 4
  g_calls = []
  g = remat.checkpoint(lambda x, s: g_calls.append(None) or x * s)
  g(X, 2.0)  # a weakly typed Python scalar is its own input type
  g(X, jnp.float32(2.0))
  g(X, 3.0)
  assert len(g_calls) == 2
  # The first differentiated call traces once too.
  h, h_calls = _counted()
  jax.grad(lambda w: h(X, w).sum())(w)
  assert len(h_calls) == 1
  # Repeated jax.vjp calls, their vjp functions run: still the one trace (jax.checkpoint: one too).
  k, k_calls = _counted()
  for _ in range(3):
    out, vjp = jax.vjp(lambda w: k(X, w), w)
    vjp(jnp.ones_like(out))
  assert len(k_calls) == 1


@pytest.mark.parametrize("ckpt", [jax.checkpoint, remat.checkpoint], ids=["jax", "remat"])
def test_linearize_evaluates_only_what_the_tangent_needs(ckpt):
  # The linear function of sin(sin(x)) needs cos(x) and cos(sin(x)): one sin, as in jax.checkpoint.
  y, lin = jax.linearize(ckpt(lambda x: jnp.sin(jnp.sin(x))), 0.5)
  text = jax.jit(lin).lower(1.0).as_text()
  assert text.count("stablehlo.sine") == 1 and text.count("stablehlo.cosine") == 2, text
  np.testing.assert_allclose(lin(1.0), jnp.cos(jnp.sin(0.5)) * jnp.cos(0.5), rtol=1e-6)


def test_trace_cache_keeps_no_tracers():
  # A checkpointed function that reads a traced value from outside its arguments: jax.checkpoint
  # caches the first trace's tracer and fails on the next call; ours retraces and stays exact.
  box = {}
  calls = []

  def f(x):
    calls.append(None)
    return jnp.sin(x) * box["w"]

  g = remat.checkpoint(f)

  def loss(w):
    box["w"] = w
    out = g(X).sum()
    box.clear()  # the test's own reference to the tracer is not remat's leak (jax 0.12 reports it)
    return out

  for w in (2.0, 3.0):
    np.testing.assert_allclose(jax.grad(loss)(w), jnp.sin(X).sum(), rtol=1e-6)
  assert len(calls) == 2
  with jax.checking_leaks():
    jax.grad(loss)(4.0)


# -- tracebacks -----------------------------------------------------------------

@pytest.fixture
def filtered_tracebacks():
  """What jax's default ("auto") picks outside IPython; restored afterwards."""
  old = jax.config.jax_traceback_filtering
  jax.config.update("jax_traceback_filtering", "quiet_remove_frames")
  yield
  jax.config.update("jax_traceback_filtering", old)


def traceback_files(excinfo) -> list[str]:
  return [f"{f.filename}:{f.name}" for f in traceback.extract_tb(excinfo.value.__traceback__)]


def user_error(x):
  raise ValueError("bad input")


@pytest.mark.parametrize("how", ["eager", "jit", "grad", "jvp", "nested"])
def test_errors_inside_a_checkpoint_show_the_users_frames_not_ours(filtered_tracebacks, how):
  f = remat.checkpoint(user_error)
  call = {"eager": lambda: f(X), "jit": lambda: jax.jit(f)(X),
          "grad": lambda: jax.grad(lambda x: f(x).sum())(X),
          "jvp": lambda: jax.jvp(f, (X,), (X,)),
          "nested": lambda: remat.checkpoint(lambda x: f(x) * 2)(X)}[how]
  with pytest.raises(ValueError, match="bad input") as excinfo:
    call()
  files = traceback_files(excinfo)
  assert any(f.endswith(":user_error") for f in files), files
  assert not [f for f in files if f"remat{os.sep}_src" in f], files
