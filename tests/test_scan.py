"""Scanned Flax stacks: remat.linen.scan, remat.nnx.Scan / remat.nnx.scan, execute.scan_levels.

Layouts against nn.scan / nnx.scan (weights load both ways), gradients against flax's scans and the
unrolled Sequential, dropout exactness, the compiled schedule (forward matmuls weighted by loop trip
counts) against the plan, memory against flax's checkpointed scans, irregular plans and bad arguments.
"""

import dataclasses
import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import remat
from remat import segmenters as S
from remat._src.chains import execute, scanned
from remat._src.plans import plan as plan_lib
from remat_bench.models.linen import TransformerBlock
from remat_bench.models.nnx import TransformerBlock as NNXBlock
from exactness import assert_close_to_scale, assert_same_gradients
import error_cases

N, WIDTH, HEADS = 4, 32, 4
SPLITS = {"params": True, "dropout": True}


def bit_equal(a, b) -> bool:
  return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: bool((x == y).all()), a, b)))


def executed_forward_dots(prof: remat.Profile) -> int:
  """``Profile.forward_dots`` with every dot counted as often as the loops around it run.

  A scanned program holds one copy of a loop body; its ``while`` carries XLA's
  ``known_trip_count``. Computations are weighted by the product of the trip
  counts on their call path from ENTRY.
  """
  head = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
  comps, entry, cur = {}, None, None
  for line in prof.hlo.splitlines():
    m = head.match(line)
    if m:
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
    elif cur is not None:
      comps[cur].append(line)
  calls = {c: [] for c in comps}
  for c, lines in comps.items():
    for line in lines:
      if " while(" in line:
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        assert trip, f"a loop without a known trip count: {line[:200]}"
        calls[c].append((re.search(r"body=%?([\w.\-]+)", line).group(1), int(trip.group(1))))
      else:
        calls[c] += [(callee, 1) for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)]

  @functools.lru_cache(maxsize=None)
  def dots(c):
    own = dataclasses.replace(prof, hlo="\n".join(comps[c])).forward_dots()
    return own + sum(k * dots(callee) for callee, k in calls[c] if callee in comps)

  return dots(entry)


# -- linen ----------------------------------------------------------------------------------


class CarryBlock(TransformerBlock):
  """``nn.scan``'s body convention, ``(carry, ys)``, around the same block (same parameters)."""

  def __call__(self, x, train=False):
    return super().__call__(x, train), None


def flax_scan(remat_block=False, single_trace=False):
  body = nn.remat(CarryBlock, static_argnums=(2,)) if remat_block else CarryBlock
  kw = dict(check_constancy_invariants=False) if single_trace else {}
  return nn.scan(body, variable_axes={"params": 0}, split_rngs=SPLITS, length=N, in_axes=(nn.broadcast,),
                 **kw)(WIDTH, HEADS, dropout_rate=0.1)


def ours(seg=None, n=N):
  return remat.linen.scan(TransformerBlock, length=n, segmenter=seg)(WIDTH, HEADS, dropout_rate=0.1)


@pytest.fixture(scope="module")
def data():
  x = jax.random.normal(jax.random.key(1), (2, 16, WIDTH))
  return x, flax_scan(remat_block=True).init(jax.random.key(0), x, False)


def test_linen_init_is_nn_scans_and_weights_load_both_ways(data):
  x, v_flax = data
  v_ours = ours(S.every(2)).init(jax.random.key(0), x, False)
  chex.assert_trees_all_equal(v_ours, v_flax)  # same tree, shapes and values
  assert v_ours["params"]["fc1"]["kernel"].shape == (N, WIDTH, 4 * WIDTH)
  # Inside a parent, params sit under the module's name, as with nn.scan.
  class Parent(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(WIDTH)(x)
      stack = remat.linen.scan(TransformerBlock, length=N, segmenter=S.every(1))
      return stack(WIDTH, HEADS, name="blocks")(x)

  class FlaxParent(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(WIDTH)(x)
      return nn.scan(nn.remat(CarryBlock), variable_axes={"params": 0}, split_rngs=SPLITS, length=N)(
          WIDTH, HEADS, name="blocks")(x, None)[0]

  pv, fv = Parent().init(jax.random.key(0), x), FlaxParent().init(jax.random.key(0), x)
  chex.assert_trees_all_equal(pv, fv)
  # Either model applies the other's variables, with the same outputs (no dropout here).
  chex.assert_trees_all_close(jax.jit(Parent().apply)(fv, x), jax.jit(FlaxParent().apply)(pv, x), atol=1e-5,
                              rtol=1e-5)


def dropout_grads(model, x, v, key=5, pair=False):
  rngs = {"dropout": jax.random.key(key)}
  out = lambda v, x: model.apply(v, x, True, rngs=rngs)  # noqa: E731
  loss = lambda v, x: (out(v, x)[0] if pair else out(v, x)).sum()  # noqa: E731
  return remat.jit(jax.grad(loss, argnums=(0, 1)))(v, x)


@pytest.fixture(scope="module")
def reference_grads(data):
  """Our plain scan's, and nn.scan's with the keys ours derives: split per layer, folded, traced once."""
  x, v = data
  plain = dropout_grads(ours(None), x, v)
  assert bit_equal(plain, dropout_grads(flax_scan(single_trace=True), x, v, pair=True))
  assert not bit_equal(plain, dropout_grads(ours(None), x, v, key=6))  # the masks are real
  return plain


@pytest.mark.parametrize("seg", [S.every(1), S.multilevel(2), S.every(2).plan(N)], ids=str)
def test_linen_dropout_gradients_bit_identical_across_segmenters_and_equal_to_flax_scan(data, reference_grads,
                                                                                       seg):
  x, v = data
  assert_same_gradients(dropout_grads(ours(seg), x, v), reference_grads)


def test_linen_gradients_equal_unrolled_sequential_and_checkpointed_nn_scan(data):
  x, v = data
  seq = remat.linen.Sequential([TransformerBlock(WIDTH, HEADS) for _ in range(N)], segmenter=S.every(2))
  unstacked = {"params": {f"layers_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], v["params"])
                          for i in range(N)}}
  loss = lambda m: lambda v, x: jnp.sum(jnp.tanh(m.apply(v, x, False)) ** 2)  # noqa: E731
  want = jax.grad(loss(seq), argnums=(0, 1))(unstacked, x)
  got = jax.grad(loss(ours(S.every(2))), argnums=(0, 1))(v, x)
  restacked = {"params": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *want[0]["params"].values())}
  chex.assert_trees_all_close((restacked, want[1]), got, atol=1e-4, rtol=1e-4)
  flax_loss = lambda v, x: jnp.sum(jnp.tanh(flax_scan(True).apply(v, x, False)[0]) ** 2)  # noqa: E731
  chex.assert_trees_all_close(jax.grad(flax_loss, argnums=(0, 1))(v, x), got, atol=1e-4, rtol=1e-4)


def test_linen_rng_counters_advance_once_per_call_like_nn_scan(data):
  x, v = data

  def twice(stack_factory):
    class Twice(nn.Module):
      @nn.compact
      def __call__(self, x):
        stack = stack_factory()
        y = stack(x, True)
        y = stack(y[0] if isinstance(y, tuple) else y, True)
        return y[0] if isinstance(y, tuple) else y
    return Twice()

  mk_ours = lambda: remat.linen.scan(TransformerBlock, length=N, segmenter=S.every(2))(  # noqa: E731
      WIDTH, HEADS, dropout_rate=0.1, name="s")
  mk_flax = lambda: nn.scan(CarryBlock, variable_axes={"params": 0}, split_rngs=SPLITS, length=N,  # noqa: E731
                            in_axes=(nn.broadcast,), check_constancy_invariants=False)(
      WIDTH, HEADS, dropout_rate=0.1, name="s")
  pv = {"params": {"s": v["params"]}}
  rngs = {"dropout": jax.random.key(3)}
  got = remat.jit(functools.partial(twice(mk_ours).apply, rngs=rngs))(pv, x)
  assert bit_equal(got, remat.jit(functools.partial(twice(mk_flax).apply, rngs=rngs))(pv, x))


class TanhDense(nn.Module):
  """``tanh(x @ W)``: one forward matmul per layer (a linear layer's last forward may be dead code)."""

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(64, use_bias=False)(x))


@functools.lru_cache(maxsize=None)
def tanh_profile(seg, n=12):
  model = remat.linen.scan(TanhDense, length=n, segmenter=seg)()
  x = jnp.ones((128, 64))
  v = model.init(jax.random.key(0), x)
  step = remat.jit(jax.value_and_grad(lambda v, x: jnp.sum(model.apply(v, x))))
  return remat.profile(step, v, x), model.apply(v, x, method="plan_for")


@pytest.mark.parametrize("seg", [S.every(1), S.every(3), S.multilevel(2)], ids=repr)
def test_linen_compiled_forward_matmuls_equal_the_scanned_plan(seg):
  prof, plan = tanh_profile(seg)
  assert plan.scanned and len(plan.levels) == (3 if seg == S.multilevel(2) else 2)
  assert executed_forward_dots(prof) == plan.forward_evaluations
  if seg != S.multilevel(2):  # uniform segments: the scan does what the unrolled plan does
    assert plan.forward_evaluations == plan.plan.forward_evaluations == 24
  else:  # a scan keeps the forward of a trailing inner checkpoint that an unrolled plan drops
    assert plan.forward_evaluations == 3 * (4 + 2 * (2 + 2)) > plan.plan.forward_evaluations
  plain, plain_plan = tanh_profile(None)
  assert executed_forward_dots(plain) == plain_plan.forward_evaluations == 12
  assert prof.temp_bytes < plain.temp_bytes


class TrainBlock(TransformerBlock):
  def __call__(self, x):
    return super().__call__(x, True)


class TrainCarryBlock(TrainBlock):
  def __call__(self, x, _):
    return super().__call__(x), None


def step_temp(module, x, pair):
  def loss(p, x, k):
    y = module.apply({"params": p}, x, *((None,) if pair else ()), rngs={"dropout": k})
    return jnp.mean((y[0] if pair else y) ** 2)
  p = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x.shape),
                                         *((None,) if pair else ())))["params"]
  return remat.profile(jax.value_and_grad(loss), p, x, jax.random.key(0)).temp_bytes


@pytest.mark.parametrize("k", [1, 4])
def test_linen_memory_within_two_percent_of_flax_at_the_same_segmentation(k):
  n, w = 8, 64
  x = jax.ShapeDtypeStruct((2, 64, w), jnp.float32)
  if k == 1:
    peer = nn.scan(nn.remat(TrainCarryBlock), variable_axes={"params": 0}, split_rngs=SPLITS, length=n)(
        w, HEADS, dropout_rate=0.1)
  else:
    peer = nn.remat_scan(TrainBlock, lengths=(n // k, k), variable_axes={"params": 0}, split_rngs=SPLITS)(
        w, HEADS, dropout_rate=0.1)
  mine = remat.linen.scan(TrainBlock, length=n, segmenter=S.every(k))(w, HEADS, dropout_rate=0.1)
  theirs, got = step_temp(peer, x, pair=k == 1), step_temp(mine, x, pair=False)
  assert got <= 1.02 * theirs, (got, theirs)
  plain = step_temp(remat.linen.scan(TrainBlock, length=n)(w, HEADS, dropout_rate=0.1), x, pair=False)
  assert got < 0.8 * plain


def test_linen_irregular_plans_are_reported_and_refused():
  with pytest.raises(remat.linen.NotScannableError, match=r"revolve\(slots=2\).*6 layers.*never unrolled.*"
                     r"every\(k\)` for k in \[1, 2, 3, 6\].*remat.linen.Sequential"):
    remat.linen.scan(TanhDense, length=6, segmenter=S.revolve(2))
  with pytest.raises(ValueError, match=r"sizes \[4, 2\]"):  # NotScannableError is a ValueError
    remat.linen.scan(TanhDense, length=6, segmenter=S.every(4))
  with pytest.raises(remat.linen.NotScannableError, match=r"custom"):
    remat.linen.scan(TanhDense, length=4, segmenter=remat.Plan.from_tree(
        S.Segment(0, 4, (S.Segment(0, 3, (), True), S.Segment(3, 4, (), True)))))
  with pytest.raises(remat.linen.NotScannableError, match=r"offload"):
    remat.linen.scan(TanhDense, length=4, segmenter=S.budget(2**20, offload=remat.offload.host()))
  # What plan_for reports for a plan that cannot be scanned (a cost-based one never is).
  report = scanned.plan_stack(S.none(), 5, api="`x`")
  assert not report.scanned and "not scannable" in str(report) and report.levels == ()


def test_linen_budget_picks_the_cheapest_regular_plan_that_compiles_under_it():
  plain, _ = tanh_profile(None)
  every1, _ = tanh_profile(S.every(1))
  limit = (plain.temp_bytes + every1.temp_bytes) // 2
  prof, report = tanh_profile(S.budget(limit))
  assert report.scanned and report.plan.compiled_temp_bytes <= limit
  assert report.plan.made_by.startswith(f"budget({limit}) -> scan ")
  assert 12 < report.forward_evaluations <= 24
  assert prof.temp_bytes <= limit


def test_linen_auto_under_fit_runs_a_regular_plan_and_fits():
  model = remat.linen.scan(TanhDense, length=8, segmenter=S.auto())()
  x = jnp.ones((256, 64))
  v = model.init(jax.random.key(0), x)
  unckpt = remat.linen.scan(TanhDense, length=8)()
  plain = remat.profile(jax.grad(lambda v, x: unckpt.apply(v, x).sum()), v, x)
  memory = plain.peak_bytes - 2 * 256 * 64 * 4
  fitted = remat.fit(jax.grad(lambda v, x: model.apply(v, x).sum()), memory)
  report = fitted.plans(v, x)
  assert report.fits and report.profile.peak_bytes <= memory


LINEN_CONSTRUCTION_ERRORS = {
    "instance": (TypeError, r"`remat.linen.scan` expects a `flax.linen.Module` subclass.*instance",
                 lambda: remat.linen.scan(TanhDense(), length=2)),
    "length_zero": (ValueError, r"`length` argument to `remat.linen.scan` must be a positive int",
                    lambda: remat.linen.scan(TanhDense, length=0)),
    "variable_axis_1": (ValueError, r"axis 0.*\{'params': 1\}",
                        lambda: remat.linen.scan(TanhDense, length=2, variable_axes={"params": 1})),
    "split_rngs_int": (TypeError, r"`split_rngs` argument to `remat.linen.scan`",
                       lambda: remat.linen.scan(TanhDense, length=2, split_rngs={"dropout": 1})),
    "segmenter_string": (TypeError, r"`segmenter` of `remat.linen.scan`.*'sqrt'",
                         lambda: remat.linen.scan(TanhDense, length=4, segmenter="sqrt")),
    "plan_for_other_length": (ValueError, r"plan is for 4 layers but the chain has 6",
                              lambda: remat.linen.scan(TanhDense, length=6, segmenter=S.every(2).plan(4))),
}


@pytest.mark.parametrize("case", LINEN_CONSTRUCTION_ERRORS)
def test_linen_construction_errors(case):
  error_cases.expect(LINEN_CONSTRUCTION_ERRORS, case)


def test_linen_call_errors():
  x = jnp.ones((2, 64))
  model = remat.linen.scan(TanhDense, length=4, segmenter=S.every(2))()
  v = model.init(jax.random.key(0), x)
  nested = {"params": jax.tree_util.tree_map(lambda a: a.reshape((2, 2) + a.shape[1:]), v["params"])}
  with pytest.raises(ValueError, match=r"leading axis of length 4.*\(2, 2, 64, 64\).*reshape"):
    model.apply(nested, x)
  with pytest.raises(NotImplementedError, match=r"`remat.linen.scan`.*\['intermediates', 'params'\]"):
    model.apply(v, x, mutable=True)


# -- NNX ------------------------------------------------------------------------------------


def make_block(rngs):
  return NNXBlock(WIDTH, HEADS, dropout_rate=0.1, rngs=rngs)


def flax_stack(n=N):
  """flax's recipe: a stack made by nnx.vmap over split Rngs, run by nnx.scan(nnx.remat(f))."""
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return make_block(rngs)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  @nnx.remat
  def forward(x, block):
    return block(x)

  class Stack(nnx.Module):
    def __init__(self, rngs):
      self.layers = create(rngs)

    def __call__(self, x):
      return forward(x, self.layers)

  return Stack(nnx.Rngs(params=0, dropout=1))


def nnx_grads(model, x, calls=2):
  """Parameter gradients of ``calls`` consecutive jitted steps (the RNG counts advance in between)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @remat.jit
  def step(params, rest):
    m = nnx.merge(graphdef, params, rest)
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
    return g, nnx.split(m, nnx.Param, ...)[2]

  out = []
  for _ in range(calls):
    g, rest = step(params, rest)
    out.append(g["layers"])
  nnx.update(model, rest)
  return out


def test_nnx_state_is_flax_stacks_and_loads_both_ways():
  ref = flax_stack()
  mine = remat.nnx.Scan(make_block, length=N, rngs=nnx.Rngs(params=0, dropout=1), segmenter=S.every(2))
  chex.assert_trees_all_equal(nnx.state(mine.layers), nnx.state(ref.layers))  # tree, shapes, values
  assert mine.layers.fc1.kernel.shape == (N, WIDTH, 4 * WIDTH)
  other = remat.nnx.Scan(make_block, length=N, rngs=nnx.Rngs(params=7, dropout=8))
  nnx.update(other.layers, nnx.state(ref.layers))
  chex.assert_trees_all_equal(nnx.state(other.layers), nnx.state(ref.layers))
  nnx.update(ref.layers, nnx.state(mine.layers))


@pytest.fixture(scope="module")
def nnx_reference():
  """nnx.scan(nnx.remat(f))'s gradients over two calls and its RNG state after them; our plain scan's."""
  x = jax.random.normal(jax.random.key(1), (2, 16, WIDTH))
  ref = flax_stack()
  want = nnx_grads(ref, x)
  plain = nnx_grads(remat.nnx.Scan(make_block, length=N, rngs=nnx.Rngs(params=0, dropout=1)), x)
  assert_close_to_scale(plain, want)
  assert not bit_equal(want[0], want[1])  # the second call drew new masks
  return x, want, plain, nnx.state(ref.layers, nnx.RngState)


@pytest.mark.parametrize("seg", [S.every(1), S.multilevel(2)], ids=repr)
def test_nnx_dropout_gradients_equal_nnx_scan_and_bit_identical_across_segmenters(nnx_reference, seg):
  x, want, plain, rng_state = nnx_reference
  mine = remat.nnx.Scan(make_block, length=N, rngs=nnx.Rngs(params=0, dropout=1), segmenter=seg)
  got = nnx_grads(mine, x)
  assert_same_gradients(got, plain)
  assert_close_to_scale(got, want)
  chex.assert_trees_all_equal(nnx.state(mine.layers, nnx.RngState), rng_state)  # counts advanced alike


class TanhLinear(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(64, 64, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


@pytest.mark.parametrize("seg", [S.every(3), S.multilevel(2)], ids=repr)
def test_nnx_compiled_forward_matmuls_equal_the_scanned_plan(seg):
  blocks = remat.nnx.stack(TanhLinear, length=12, rngs=nnx.Rngs(0))
  forward = remat.nnx.scan(lambda b, x: b(x), segmenter=seg)
  graphdef, state = nnx.split(blocks)
  x = jnp.ones((128, 64))

  def step(state, x):
    return jax.value_and_grad(lambda s: forward(nnx.merge(graphdef, s), x).sum())(state)

  prof = remat.profile(step, state, x)
  assert executed_forward_dots(prof) == forward.plan_for(blocks, x).forward_evaluations


def test_nnx_memory_within_two_percent_of_nnx_scan_remat():
  n, w = 8, 64

  def temp(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, rest, x):
      return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(nnx.merge(graphdef, params, rest))

    return remat.profile(step, params, rest, jax.ShapeDtypeStruct((2, 64, w), jnp.float32)).temp_bytes

  mb = lambda rngs: NNXBlock(w, HEADS, dropout_rate=0.1, rngs=rngs)  # noqa: E731

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  @nnx.remat
  def forward(x, block):
    return block(x)

  class Peer(nnx.Module):
    def __init__(self):
      self.layers = remat.nnx.stack(mb, length=n, rngs=nnx.Rngs(params=0, dropout=1))

    def __call__(self, x):
      return forward(x, self.layers)

  got = temp(remat.nnx.Scan(mb, length=n, rngs=nnx.Rngs(params=0, dropout=1), segmenter=S.every(1)))
  theirs = temp(Peer())
  assert got <= 1.02 * theirs, (got, theirs)


def test_nnx_irregular_plans_and_budget():
  with pytest.raises(remat.nnx.NotScannableError, match=r"`remat.nnx.Scan`.*revolve.*every\(k\)` for k in"):
    remat.nnx.Scan(TanhLinear, length=6, rngs=nnx.Rngs(0), segmenter=S.revolve(2))
  blocks = remat.nnx.stack(TanhLinear, length=6, rngs=nnx.Rngs(0))
  x = jnp.ones((8, 64))
  forward = remat.nnx.scan(lambda b, x: b(x), segmenter=S.revolve(2))
  assert not forward.plan_for(blocks, x).scanned
  with pytest.raises(remat.nnx.NotScannableError, match=r"`remat.nnx.scan`.*never unrolled"):
    forward(blocks, x)
  fitted = remat.nnx.scan(lambda b, x: b(x), segmenter=S.budget(10**9))
  report = fitted.plan_for(blocks, x)
  assert report.scanned and report.levels == ((6, False),)  # plain fits: nothing recomputed


def _linear64():
  return nnx.Linear(64, 32, rngs=nnx.Rngs(0))


NNX_ERRORS = {
    "length_negative": (ValueError, r"`length` argument to `remat.nnx.Scan` must be a positive int",
                        lambda: remat.nnx.Scan(TanhLinear, length=-1, rngs=nnx.Rngs(0))),
    "scan_of_a_module": (TypeError, r"`remat.nnx.scan` expects a function",
                         lambda: remat.nnx.scan(remat.nnx.stack(TanhLinear, length=2, rngs=nnx.Rngs(0)))),
    "segmenter_int": (TypeError, r"`segmenter` of `remat.nnx.scan`",
                      lambda: remat.nnx.scan(lambda b, x: b(x), segmenter=3)),
    "stack_of_an_instance": (TypeError, r"`remat.nnx.stack` expects a function",
                             lambda: remat.nnx.stack(TanhLinear(nnx.Rngs(0)), length=2, rngs=nnx.Rngs(0))),
    "unstacked_module": (ValueError, r"one leading axis.*remat.nnx.stack",
                         lambda: remat.nnx.scan(lambda b, x: b(x))(_linear64(), jnp.ones((8, 64)))),
    "array_for_module": (TypeError, r"stacked `nnx.Module`",
                         lambda: remat.nnx.scan(lambda b, x: b(x))(jnp.ones((8, 64)), jnp.ones((8, 64)))),
}


@pytest.mark.parametrize("case", NNX_ERRORS)
def test_nnx_errors(case):
  error_cases.expect(NNX_ERRORS, case)


# -- execution and regular plans ----------------------------------------------------------------


def test_regular_candidates_round_trip_and_scanned_evaluations():
  for levels in scanned.regular_candidates(24):
    assert tuple(plan_lib.regular_levels(scanned.levels_tree(levels))) == levels
  assert scanned.scanned_evaluations(((12, True), (4, False))) == 96
  nested = ((4, True), (4, True), (3, False))
  assert scanned.describe_levels(nested) == "4 x checkpoint(4 x checkpoint(3 taped))"


def test_scan_levels_outputs_and_a_uniform_layer_policy():
  ws = jax.random.normal(jax.random.key(0), (6, 16, 16)) / 4
  x = jax.random.normal(jax.random.key(1), (4, 16))
  layer = lambda w, x, k: (jnp.tanh(x @ w), jnp.sum(x))  # noqa: E731
  levels = [(3, True), (2, False)]
  y, outs = execute.scan_levels(layer, levels, ws, x, None, outputs=True)
  assert outs.shape == (6,)
  ref = x
  for i in range(6):
    assert jnp.allclose(outs[i], jnp.sum(ref), rtol=1e-5)
    ref = jnp.tanh(ref @ ws[i])
  chex.assert_trees_all_close(y, ref, atol=1e-6)
  f = lambda pol: lambda ws: execute.scan_levels(  # noqa: E731
      lambda w, x, k: jnp.tanh(x @ w), levels, ws, x, None, policy=pol).sum()
  nothing = jax.checkpoint_policies.nothing_saveable
  chex.assert_trees_all_close(jax.grad(f(nothing))(ws), jax.grad(f(None))(ws), atol=1e-6)


def test_non_uniform_layer_policies_make_a_plan_irregular():
  @dataclasses.dataclass(frozen=True)
  class PolicyPlan(remat.Plan):  # per-layer policies set directly, without a planner
    layer_policies: tuple = ()

  base = S.every(2).plan(4)
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(remat.Plan)}
  same = PolicyPlan(**fields, layer_policies=("dots",) * 4)
  mixed = PolicyPlan(**fields, layer_policies=(None, "dots") * 2)
  assert plan_lib.regular_levels(same) == [(2, True), (2, False)]
  assert execute.layer_policy(same) is jax.checkpoint_policies.dots_saveable
  assert plan_lib.regular_levels(mixed) is None
  assert "different checkpoint policies" in scanned.not_scannable_reason(mixed, 4, "`x`")
