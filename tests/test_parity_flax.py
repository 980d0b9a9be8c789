"""remat.linen.checkpoint / remat.nnx.checkpoint against nn.remat / nnx.remat where their users meet."""

import functools
import os
import traceback

import chex
import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import remat
from remat_bench.models import nnx as nnx_models

X = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)


def key_data(tree):
  return jax.tree_util.tree_map(
      lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, tree)


# -- NNX: graph= and graph_updates= ----------------------------------------------

class Block(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.bn(jnp.tanh(self.dense(x))))


MODES = [(False, True), (True, False), (False, False), (True, True)]


@pytest.mark.parametrize("graph, graph_updates", MODES,
                         ids=["tree", "no_graph_updates", "tree_no_updates", "graph"])
def test_nnx_graph_and_graph_updates_match_nnx_remat(graph, graph_updates):
  """Gradients, BatchNorm statistics and RNG state after two steps, as nnx.remat gives them."""
  results = {}
  for kind, wrap in (("flax", nnx.remat), ("ours", remat.nnx.checkpoint)):
    model = Block(nnx.Rngs(0, dropout=1))
    f = wrap(lambda m, x: m(x), graph=graph, graph_updates=graph_updates)
    step = nnx.jit(nnx.value_and_grad(lambda m, f=f: jnp.sum(f(m, X) ** 2),
                                      argnums=nnx.DiffState(0, nnx.Param)))
    losses_grads = [step(model) for _ in range(2)]
    results[kind] = (losses_grads, key_data(nnx.state(model, nnx.Not(nnx.Param))))
  chex.assert_trees_all_close(results["ours"], results["flax"], atol=1e-6, rtol=1e-6)
  (l0, _), (l1, _) = results["ours"][0]
  assert abs(float(l0) - float(l1)) > 1e-4  # the second step drew fresh dropout masks


def test_nnx_tree_mode_recomputes_like_nnx_remat_and_rejects_shared_variables():
  counts = {}
  for kind, wrap in (("ours", remat.nnx.checkpoint), ("flax", nnx.remat)):
    model = nnx_models.MLP(4, 16, block_wrapper=functools.partial(wrap, graph=False), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    step = jax.value_and_grad(lambda s, g=graphdef: jnp.sum(nnx.merge(g, s)(jnp.ones((32, 16))) ** 2))
    counts[kind] = remat.profile(step, state).count_dots(lhs_contracting=(1,), rhs_contracting=(0,))
  assert counts == {"ours": 8, "flax": 8}  # 4 blocks, each evaluated twice

  class Shared(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(4, 4, rngs=rngs)
      self.b = self.a

  for wrap in (remat.nnx.checkpoint, nnx.remat):
    m = Shared(nnx.Rngs(0))
    with pytest.raises(ValueError):  # tree mode does not support shared Variables
      wrap(lambda m, x: m.b(m.a(x)), graph=False)(m, X)


def test_nnx_graph_mode_follows_the_global_setting_and_checks_keywords():
  calls = []

  def f(m, x):
    calls.append(None)
    return m(x)

  model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  with nnx.set_graph_mode(False):
    g = remat.nnx.checkpoint(f)  # read when decorating, as nnx.remat does
  chex.assert_trees_all_close(g(model, X), nnx.remat(f, graph=False)(model, X))
  with pytest.raises(TypeError, match=r"`graph` argument to `remat.nnx.checkpoint` must be a bool.*'no'"):
    remat.nnx.checkpoint(f, graph="no")
  with pytest.raises(TypeError, match=r"`graph_updates`.*must be a bool"):
    remat.nnx.checkpoint(graph_updates=1)


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "tree"])
def test_nnx_eager_calls_trace_once_like_nnx_remat(graph):
  def counted(calls):
    def f(m, x):
      calls.append(None)
      return m(x)
    return f

  counts = {}
  for kind, wrap in (("ours", remat.nnx.checkpoint), ("flax", nnx.remat)):
    calls = []
    g, model = wrap(counted(calls), graph=graph), nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    for _ in range(5):
      g(model, X)
    for _ in range(2):
      nnx.grad(lambda m, g=g: g(m, X).sum())(model)
    counts[kind] = len(calls)
  assert counts["ours"] == counts["flax"] == 1


# -- error types -------------------------------------------------------------------

def test_errors_are_also_the_peers_types():
  dense = nn.Dense(3)
  for bad in (dense, 3, int):
    with pytest.raises(flax.errors.TransformTargetError) as ours:
      remat.linen.checkpoint(bad)
    assert isinstance(ours.value, TypeError) and "`remat.linen.checkpoint`" in str(ours.value)
  with pytest.raises(flax.errors.TransformTargetError):  # what flax raises for the same mistake
    nn.remat(dense)
  with pytest.raises(remat.linen.TransformTargetError, match=r"instance of `Dense`.*wrap the class"):
    remat.linen.checkpoint(dense)
  assert "flax.readthedocs.io" not in str(ours.value)  # our message, not flax's link to it

  block = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  for target in (block.__call__, functools.partial(block.__call__)):
    with pytest.raises(ValueError) as ours:
      remat.nnx.checkpoint(target)
    assert isinstance(ours.value, (TypeError, remat.nnx.BoundMethodError))
    assert "bound method" in str(ours.value) and "`remat.nnx.checkpoint`" in str(ours.value)
    with pytest.raises(ValueError, match="bound methods"):
      nnx.remat(target)


# -- automatic static arguments: the way back ---------------------------------------

class LinenScaled(nn.Module):
  @nn.compact
  def __call__(self, x, flip):
    y = nn.Dense(4)(x)
    return jnp.where(flip, -y, y)  # works whether `flip` is static or traced


class LinenBranching(nn.Module):
  @nn.compact
  def __call__(self, x, flip):
    y = nn.Dense(4)(x)
    return -y if flip else y  # needs a static `flip`


def test_linen_auto_static_false_traces_flags_as_nn_remat_does():
  v = LinenScaled().init(jax.random.key(0), X, True)
  ours, peer = remat.linen.checkpoint(LinenScaled, auto_static=False), nn.remat(LinenScaled)
  for flip in (True, False):
    chex.assert_trees_all_close(ours().apply(v, X, flip), peer().apply(v, X, flip))
  # A traced flag cannot steer Python control flow: the same error as with nn.remat.
  for wrap in (functools.partial(remat.linen.checkpoint, auto_static=False), nn.remat):
    with pytest.raises(jax.errors.TracerBoolConversionError):
      wrap(LinenBranching)().apply(v, X, True)
  # By default the flag is static, and the branching module works.
  chex.assert_trees_all_close(remat.linen.checkpoint(LinenBranching)().apply(v, X, True),
                              LinenBranching().apply(v, X, True))
  with pytest.raises(TypeError, match=r"`auto_static`.*`remat.linen.checkpoint` must be a bool"):
    remat.linen.checkpoint(LinenScaled, auto_static="no")


def test_nnx_auto_static_false_traces_flags_as_nnx_remat_does():
  model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  where = lambda m, x, flip: jnp.where(flip, -m(x), m(x))  # noqa: E731
  branch = lambda m, x, flip: -m(x) if flip else m(x)  # noqa: E731
  ours = remat.nnx.checkpoint(where, auto_static=False)
  for flip in (True, False):
    chex.assert_trees_all_close(ours(model, X, flip), nnx.remat(where)(model, X, flip))
  for wrap in (functools.partial(remat.nnx.checkpoint, auto_static=False), nnx.remat):
    with pytest.raises(jax.errors.TracerBoolConversionError):
      wrap(branch)(model, X, True)
  chex.assert_trees_all_close(remat.nnx.checkpoint(branch)(model, X, True), branch(model, X, True))


def test_adapters_take_prevent_cse_as_a_bool_only():
  for api, make in (("remat.linen.checkpoint", lambda **kw: remat.linen.checkpoint(LinenScaled, **kw)),
                    ("remat.nnx.checkpoint", lambda **kw: remat.nnx.checkpoint(lambda m, x: m(x), **kw))):
    with pytest.raises(TypeError, match=rf"`prevent_cse` argument to `{api}` must be a bool.*\(True, False"):
      make(prevent_cse=(True, False))


# -- tracebacks -----------------------------------------------------------------------

@pytest.fixture
def filtered_tracebacks():
  old = jax.config.jax_traceback_filtering
  jax.config.update("jax_traceback_filtering", "quiet_remove_frames")  # "auto" outside IPython
  yield
  jax.config.update("jax_traceback_filtering", old)


def _remat_frames(excinfo):
  frames = [f"{f.filename}:{f.name}" for f in traceback.extract_tb(excinfo.value.__traceback__)]
  return frames, [f for f in frames if f"remat{os.sep}_src" in f]


class Failing(nn.Module):
  @nn.compact
  def __call__(self, x):
    raise ValueError("bad block")


class NnxFailing(nnx.Module):
  def __call__(self, x):
    raise ValueError("bad block")


@pytest.mark.parametrize("kind", ["linen", "nnx", "nnx_tree"])
def test_errors_inside_checkpointed_modules_show_the_users_frames(filtered_tracebacks, kind):
  if kind == "linen":
    call = lambda: remat.linen.checkpoint(Failing)().init(jax.random.key(0), X)  # noqa: E731
  else:
    f = remat.nnx.checkpoint(lambda m, x: m(x), graph=kind == "nnx")
    call = lambda: jax.jit(lambda x: f(NnxFailing(), x))(X)  # noqa: E731
  with pytest.raises(ValueError, match="bad block") as excinfo:
    call()
  frames, ours = _remat_frames(excinfo)
  assert any(f.endswith(":__call__") and "test_parity_flax" in f for f in frames), frames
  assert not ours, ours
