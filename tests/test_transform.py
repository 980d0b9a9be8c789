"""remat.checkpoint against plain jax.grad and jax.checkpoint."""

import dataclasses
import functools

import chex
import jax.extend
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import error_cases
import remat
from remat._src.util import compat
from remat._src.core import compile as remat_compile
from remat._src.core.transform import same_bits

jit_modes = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def maybe_jit(f, use_jit):
  return jax.jit(f) if use_jit else f


def assert_same(a, b, *, exact=True, tol=1e-5):
  if exact:
    chex.assert_trees_all_equal(a, b)
  else:
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


def mlp(w, x):
  return jnp.tanh(jnp.tanh(x @ w["a"]) @ w["b"])


def params(seed=0, h=8):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"a": jax.random.normal(k1, (h, h)) / 3, "b": jax.random.normal(k2, (h, h)) / 3}


def three_ways(f, argnums, *args, use_jit=False):
  """Gradients of sum(f) plainly, with jax.checkpoint and with remat.checkpoint."""
  out = []
  for wrap in (lambda g: g, jax.checkpoint, remat.checkpoint):
    g = wrap(f)

    def loss(*a, g=g):
      return jnp.sum(jax.tree_util.tree_leaves(g(*a))[0])

    out.append(maybe_jit(jax.grad(loss, argnums=argnums), use_jit)(*args))
  return out


@jit_modes
def test_pytree_grads_match_plain_and_jax_checkpoint(use_jit):
  w, x = params(), jnp.ones((4, 8))
  plain, jck, ours = three_ways(mlp, (0, 1), w, x, use_jit=use_jit)
  assert_same(ours, plain, exact=False)
  assert_same(ours, jck, exact=False)


@jit_modes
def test_none_leaves_python_scalars_ints_and_bools(use_jit):
  def f(tree, scale, n, flag):
    y = tree["x"] * scale * n.astype(jnp.float32)
    y = jnp.where(flag, y, -y)
    assert tree["none"] is None
    return {"y": jnp.sin(y), "count": n + 1, "none": None}

  tree = {"x": jnp.arange(4.0), "none": None}
  n, flag = jnp.int32(3), jnp.array(True)
  for wrap in (jax.checkpoint, remat.checkpoint):
    g = maybe_jit(jax.grad(lambda t, s, w=wrap: w(f)(t, s, n, flag)["y"].sum(), argnums=(0, 1)), use_jit)
    got = g(tree, 2.0)
    want = jax.grad(lambda t, s: f(t, s, n, flag)["y"].sum(), argnums=(0, 1))(tree, 2.0)
    assert_same(got, want, exact=False)
  # Integer outputs pass through, and int inputs are not differentiated.
  out = remat.checkpoint(f)(tree, 2.0, n, flag)
  assert out["count"] == 4 and out["none"] is None
  gx = jax.grad(lambda n: remat.checkpoint(f)(tree, 2.0, n, flag)["y"].sum(), allow_int=True)(n)
  assert gx.dtype == jax.dtypes.float0


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
@jit_modes
def test_keys_give_bit_identical_dropout(make_key, use_jit):
  def block(w, x, key):
    h = jnp.tanh(x @ w)
    return remat.rng.dropout(key, h, 0.5) @ w

  w, x, key = params()["a"], jnp.ones((4, 8)), make_key(0)
  plain, jck, ours = three_ways(block, (0, 1), w, x, key, use_jit=use_jit)
  assert_same(ours, plain)
  assert_same(ours, jck)


@jit_modes
def test_closure_over_traced_params(use_jit):
  w, x = params(), jnp.ones((4, 8))

  def loss(w, wrap):
    h = wrap(lambda x: mlp(w, x))(x)  # closes over the traced w
    h = wrap(lambda x: mlp(w, x) * w["a"][0])(h)
    return h.sum()

  want = jax.grad(lambda w: loss(w, lambda f: f))(w)
  got = maybe_jit(jax.grad(lambda w: loss(w, remat.checkpoint)), use_jit)(w)
  assert_same(got, want, exact=False)
  got_jck = jax.grad(lambda w: loss(w, jax.checkpoint))(w)
  assert_same(got, got_jck, exact=False)


def test_vmap_and_grad_of_vmap():
  w, xs = params(), jnp.linspace(-1, 1, 5 * 4 * 8).reshape(5, 4, 8)
  f = remat.checkpoint(mlp)
  chex.assert_trees_all_close(jax.vmap(f, (None, 0))(w, xs), jax.vmap(mlp, (None, 0))(w, xs))
  g = jax.grad(lambda w: jax.vmap(f, (None, 0))(w, xs).sum())(w)
  g0 = jax.grad(lambda w: jax.vmap(mlp, (None, 0))(w, xs).sum())(w)
  assert_same(g, g0, exact=False)
  # vmap of grad as well: per-example gradients.
  pg = jax.vmap(jax.grad(lambda w, x: f(w, x).sum()), (None, 0))(w, xs)
  pg0 = jax.vmap(jax.grad(lambda w, x: mlp(w, x).sum()), (None, 0))(w, xs)
  assert_same(pg, pg0, exact=False)


@jit_modes
def test_inside_scan_over_layers(use_jit):
  ws = jax.random.normal(jax.random.key(1), (6, 8, 8)) / 3
  x = jnp.ones((4, 8))

  def run(ws, wrap):
    def body(h, w):
      return wrap(lambda w, h: jnp.tanh(h @ w))(w, h), None
    return jax.lax.scan(body, x, ws)[0].sum()

  want = jax.grad(run)(ws, lambda f: f)
  got = maybe_jit(jax.grad(functools.partial(run, wrap=remat.checkpoint)), use_jit)(ws)
  assert_same(got, want, exact=False)
  assert_same(got, jax.grad(run)(ws, jax.checkpoint), exact=False)


def test_grad_of_grad_and_check_grads():
  f = remat.checkpoint(lambda x: jnp.sin(x) * jnp.cos(2 * x))
  x = jnp.linspace(-1.0, 1.0, 5)
  h = jax.grad(lambda x: jax.grad(lambda y: f(y).sum())(x).sum())(x)
  h0 = jax.grad(lambda x: jax.grad(lambda y: (jnp.sin(y) * jnp.cos(2 * y)).sum())(x).sum())(x)
  assert_same(h, h0, exact=False)
  jax.test_util.check_grads(f, (x,), order=2, modes=["rev"])


@jit_modes
def test_bfloat16(use_jit):
  w = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params())
  x = jnp.ones((4, 8), jnp.bfloat16)
  plain, jck, ours = three_ways(mlp, (0, 1), w, x, use_jit=use_jit)
  assert jax.tree_util.tree_leaves(ours)[0].dtype == jnp.bfloat16
  # The same arithmetic in the same order: bit-identical.
  assert_same(ours, jck)
  chex.assert_trees_all_close(ours, plain, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("policy_name", ["dots_saveable", "names"])
def test_policy_saves_named_values_and_recomputes_the_rest(policy_name):
  from jax.ad_checkpoint import checkpoint_name

  def block(w, x):
    h = checkpoint_name(x @ w["a"], "proj")
    return jnp.tanh(jnp.tanh(h) @ w["b"])

  policy = (jax.checkpoint_policies.dots_saveable if policy_name == "dots_saveable"
            else jax.checkpoint_policies.save_only_these_names("proj"))
  w, x = params(), jnp.ones((4, 8))
  ck = remat.checkpoint(block, policy=policy)
  got = jax.grad(lambda w, x: ck(w, x).sum(), argnums=(0, 1))(w, x)
  want = jax.grad(lambda w, x: block(w, x).sum(), argnums=(0, 1))(w, x)
  jck = jax.grad(lambda w, x: jax.checkpoint(block, policy=policy)(w, x).sum(), argnums=(0, 1))(w, x)
  assert_same(got, want, exact=False)
  assert_same(got, jck, exact=False)
  # What the policy saves is kept (both matmul outputs, or the one named projection); with no
  # policy only the inputs are.
  saved = [r for r in remat.saved_residuals(lambda x: ck(w, x).sum(), x)
           if r.shape == (4, 8) and "argument" not in r.source]
  if policy_name == "dots_saveable":
    assert len(saved) == 2 and all("dot_general" in r.source for r in saved)
  else:
    assert len(saved) == 1 and "named 'proj'" in saved[0].source
  none_res = remat.saved_residuals(lambda x: remat.checkpoint(block)(w, x).sum(), x)
  assert all("argument" in r.source or "constant" in r.source for r in none_res)
  # A saved dot is not recomputed: the compiled backward holds no second x @ w["a"].
  def fwd_dots(f):
    step = jax.value_and_grad(lambda x: f(w, x).sum())
    return remat.profile(step, x).forward_dots()

  # Two dots forward; without a policy both are recomputed, with dots_saveable
  # none, with the name policy only the unnamed second one.
  assert fwd_dots(remat.checkpoint(block)) == 4
  assert fwd_dots(ck) == (2 if policy_name == "dots_saveable" else 3)


def _barrier_eqns(jaxpr):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "optimization_barrier":
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _barrier_eqns(sub)
  return found


@pytest.mark.parametrize("prevent_cse", [True, False])
def test_prevent_cse_barrier_covers_residuals_and_cotangent(prevent_cse):
  w, x = params(), jnp.ones((4, 8))
  f = remat.checkpoint(mlp, prevent_cse=prevent_cse)
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: f(w, x).sum()))(w).jaxpr
  barriers = _barrier_eqns(jaxpr)
  if not prevent_cse:
    assert not barriers
    return
  assert len(barriers) == 1
  ins = barriers[0].invars
  # 3 inputs (x, w["a"], w["b"]) and 1 cotangent (4, 8) go through one barrier together.
  shapes = sorted(tuple(v.aval.shape) for v in ins)
  assert shapes == sorted([(4, 8), (8, 8), (8, 8), (4, 8)])


def test_determinism_check_catches_hidden_randomness():
  rs = np.random.default_rng(0)

  def noisy(x):
    noise = jax.pure_callback(lambda: rs.standard_normal(4).astype(np.float32),
                              jax.ShapeDtypeStruct((4,), jnp.float32))
    return jnp.sin(x) + noise

  f = remat.checkpoint(noisy, check_determinism=True)
  with pytest.raises(remat.RecomputationMismatchError, match="remat.checkpoint"):
    jax.grad(lambda x: f(x).sum())(jnp.ones(4))
  with pytest.raises(Exception, match="did not reproduce"):
    jax.jit(jax.grad(lambda x: f(x).sum()))(jnp.ones(4))
  # Randomness from key arguments passes the check, eager and jitted.
  g = remat.checkpoint(lambda k, x: remat.rng.dropout(k, x, 0.3), check_determinism=True)
  key = jax.random.key(3)
  jax.grad(lambda x: g(key, x).sum())(jnp.ones(4))
  jax.block_until_ready(jax.jit(jax.grad(lambda x: g(key, x).sum()))(jnp.ones(4)))


def test_determinism_check_compares_bits_in_every_dtype():
  # bf16 NaNs (log of a negative) are the same bits when recomputed: no false alarm.
  f = remat.checkpoint(jnp.log, check_determinism=True)
  for dtype in (jnp.float32, jnp.bfloat16):
    jax.grad(lambda x, f=f: f(x).sum())(jnp.array([-1.0, 2.0], dtype))
  assert not same_bits(np.float32(0.0), np.float32(-0.0))  # -0.0 is not 0.0, bit for bit


def test_static_argnums_and_decorator_forms():
  @remat.checkpoint(static_argnums=(1,))
  def f(x, n):
    for _ in range(n):
      x = jnp.sin(x)
    return x

  assert f.__name__ == "f"
  g = jax.grad(lambda x: f(x, 3).sum())(jnp.ones(3))
  g0 = jax.grad(lambda x: jnp.sin(jnp.sin(jnp.sin(x))).sum())(jnp.ones(3))
  assert_same(g, g0)

  @remat.checkpoint
  def documented(x):
    """Doc."""
    return x

  assert documented.__doc__ == "Doc." and documented.__name__ == "documented"


# -- memory and schedule, measured from the compiled program ------------------

DEPTH, BATCH, WIDTH = 16, 512, 256


def _chain_step(wrap):
  def segment(ws, x):
    for w in ws:
      x = jnp.tanh(x @ w)
    return x

  def loss(ws, x):
    for i in range(0, DEPTH, 4):
      x = wrap(segment)(ws[i:i + 4], x)
    return jnp.sum(x)

  return jax.value_and_grad(loss, argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _chain_profiles():
  ws = [jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.float32)] * DEPTH
  x = jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32)
  return {name: remat.profile(_chain_step(wrap), ws, x)
          for name, wrap in [("plain", lambda f: f), ("jax", jax.checkpoint),
                             ("remat", remat.checkpoint)]}


def test_chain_memory_matches_jax_checkpoint_and_beats_plain():
  p = _chain_profiles()
  act = BATCH * WIDTH * 4
  assert p["plain"].temp_bytes >= 15 * act  # one activation per layer
  assert abs(p["remat"].temp_bytes - p["jax"].temp_bytes) <= 0.02 * p["jax"].temp_bytes
  assert p["remat"].temp_bytes <= 0.6 * p["plain"].temp_bytes


def test_chain_recomputes_each_layer_exactly_once():
  p = _chain_profiles()
  fwd = lambda prof: prof.forward_dots()
  assert fwd(p["plain"]) == DEPTH
  assert fwd(p["remat"]) == 2 * DEPTH
  assert fwd(p["jax"]) == 2 * DEPTH


def test_without_the_compiler_option_cpu_undoes_remat():
  """Documents docs/facts.md, fact 1: the reason remat.jit exists, and where it stopped holding.

  Up to jax 0.11.0 XLA:CPU undoes remat without the option (19 activations against 7); from jax
  0.11.1 it keeps the barriers by itself (7 and 7: docs/facts.md, fact 20): the option is harmless.
  """
  if jax.default_backend() != "cpu":
    pytest.skip("CPU-specific")
  ws = [jnp.zeros((WIDTH, WIDTH))] * DEPTH
  x = jnp.zeros((BATCH, WIDTH))
  # Plain jax.jit: remat sets no process-wide flag (docs/facts.md, fact 24).
  c = jax.jit(_chain_step(remat.checkpoint)).lower(ws, x).compile()
  plain_compile, with_option = c.memory_analysis().temp_size_in_bytes, _chain_profiles()["remat"].temp_bytes
  if compat.CPU_UNDOES_REMAT:
    assert plain_compile > with_option * 1.5
  else:
    assert plain_compile <= with_option * 1.02


def test_jit_and_compiler_options():
  assert remat.compiler_options("cpu") == {
      "xla_disable_hlo_passes": "cse_barrier_expander,small-while-loop-hoisting"}  # every jax: fact 24
  merged = remat_compile.merge_compiler_options({"xla_disable_hlo_passes": "foo,cse_barrier_expander"}, "cpu")
  assert merged == {"xla_disable_hlo_passes": "foo,cse_barrier_expander,small-while-loop-hoisting"}
  assert remat.compiler_options("gpu") == {}
  f = remat.jit(lambda x: x * 2, compiler_options={"xla_disable_hlo_passes": "foo"})
  assert float(f(1.0)) == 2.0

  @remat.jit(static_argnums=1)
  def g(x, n):
    return x * n

  assert float(g(2.0, 3)) == 6.0


def test_remat_jit_inside_other_transformations():
  # jax accepts compiler options on top-level jits only; nested, remat.jit is jax.jit without ours.
  f = remat.jit(lambda x: jnp.sum(jnp.sin(x)))
  x = jnp.linspace(0.0, 1.0, 4)
  want = jnp.cos(x)
  chex.assert_trees_all_close(jax.grad(f)(x), want)
  chex.assert_trees_all_close(jax.jit(jax.grad(f))(x), want)
  chex.assert_trees_all_close(jax.vjp(f, x)[1](1.0)[0], want)
  chex.assert_trees_all_close(jax.linearize(f, x)[1](jnp.ones(4)), jnp.sum(want))
  chex.assert_trees_all_close(jax.vmap(f)(x[:, None]), jnp.sin(x))
  assert f.lower(x).compile() is not None and f.__name__ == "<lambda>"  # jax.jit's attributes


def test_profile_fields_and_str():
  p = _chain_profiles()["remat"]
  assert p.backend == jax.default_backend()
  assert p.flops > 0 and p.argument_bytes == DEPTH * WIDTH * WIDTH * 4 + BATCH * WIDTH * 4
  assert p.peak_bytes == p.argument_bytes + p.output_bytes + p.temp_bytes - p.alias_bytes
  assert "MiB" in str(p) and "GFLOP" in str(p)
  # Frozen and comparable; the HLO text is left out of equality and hashing.
  same = dataclasses.replace(p, hlo="")
  assert same == p and hash(same) == hash(p)
  assert dataclasses.replace(p, temp_bytes=p.temp_bytes + 1) != p
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.temp_bytes = 0


# -- errors --------------------------------------------------------------------

def _call_static_list():
  f = remat.checkpoint(lambda x, cfg: x * len(cfg), static_argnums=(1,))
  f(jnp.ones(2), [1, 2])


def _call_static_out_of_range():
  g = remat.checkpoint(lambda *xs: xs[0], static_argnums=(3,))
  g(jnp.ones(2))


ERROR_CASES = {
    "not callable": (TypeError, r"`remat.checkpoint` expects a callable.*got 3",
                     lambda: remat.checkpoint(3)),
    "static_argnums a string": (TypeError, r"static_argnums.*`remat.checkpoint`.*'a'",
                                lambda: remat.checkpoint(lambda x: x, static_argnums="a")),
    "static_argnums a float": (TypeError, r"static_argnums.*1.5",
                               lambda: remat.checkpoint(static_argnums=(1.5,))),
    "static_argnums beyond the arity": (ValueError, r"out of range.*\(2,\).*1 positional",
                                        lambda: remat.checkpoint(lambda x: x, static_argnums=2)),
    "policy a string": (TypeError, r"`policy`.*`remat.checkpoint`.*'save dots'",
                        lambda: remat.checkpoint(lambda x: x, policy="save dots")),
    "static argument unhashable": (TypeError, r"static argument 1.*hashable.*\[1, 2\]",
                                   _call_static_list),
    "static position beyond the call": (ValueError, r"out of range.*index 3",
                                        _call_static_out_of_range),
    "dropout rate 1": (ValueError, "rate",
                       lambda: remat.rng.dropout(jax.random.key(0), jnp.ones(2), 1.0)),
    "layer_keys of an array": (TypeError, "PRNG key",
                               lambda: remat.rng.layer_keys(jnp.ones(3), 2)),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_name_the_api_and_the_fix(case):
  error_cases.expect(ERROR_CASES, case)


def test_rng_helpers_for_both_key_kinds():
  for key in (jax.random.key(0), jax.random.PRNGKey(0)):
    ks = remat.rng.layer_keys(key, 4)
    assert len(ks) == 4
    a, b = remat.rng.layer_key(key, 1), remat.rng.layer_key(key, 1)
    assert_same(jax.random.uniform(a, (3,)), jax.random.uniform(b, (3,)))
  assert remat.rng.layer_keys(None, 2) == [None, None]
  assert remat.rng.layer_key(None, 0) is None
