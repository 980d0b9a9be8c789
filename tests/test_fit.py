"""remat.fit: a whole training step fitted to a per-device memory, read from the compiled step."""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import remat
from remat import segmenters as S
from remat.segmenters import Plan, Segment

# -- a chain of tanh layers trained with SGD (parameters donated) ------------------------

D, B, W = 16, 512, 128
ACT = B * W * 4


def tanh_layer(w, x):
  return jnp.tanh(x @ w)


def sgd_step(seg, layers=None, depth=D):
  apply = remat.sequential(layers or [tanh_layer] * depth, seg)

  def step(ws, x):
    loss, g = jax.value_and_grad(lambda ws: jnp.mean(apply(ws, x) ** 2))(ws)
    return jax.tree_util.tree_map(lambda w, d: w - 0.1 * d, ws, g), loss
  return step


def plain_plan(n):
  return Plan.from_tree(Segment(0, n))


def args(depth=D, batch=B, width=W):
  ws = [jax.random.normal(jax.random.key(i), (width, width)) / width ** 0.5 for i in range(depth)]
  return ws, jax.random.normal(jax.random.key(99), (batch, width))


@functools.lru_cache(maxsize=None)
def peak_of(seg, depth=D):
  """Compiled per-device peak and flops of the SGD step under a fixed segmentation."""
  p = remat.profile(remat.jit(sgd_step(seg, depth=depth), donate_argnums=0), *args(depth))
  return p.peak_bytes, p.flops


def test_fit_recomputes_nothing_where_plain_fits():
  fitted = remat.fit(sgd_step(S.auto()), "1GiB", donate_argnums=0)
  report = fitted.plans(*args())
  assert not report.plans[0].recomputes
  assert report.compiles == 1 and report.fits
  assert report.profile.peak_bytes == peak_of(plain_plan(D))[0]


def test_fit_fits_the_compiled_step_and_trains_like_plain():
  plain_peak, plain_flops = peak_of(plain_plan(D))
  memory = int(0.6 * plain_peak)
  fitted = remat.fit(sgd_step(S.auto()), memory, donate_argnums=0)
  ws, x = args()
  report = fitted.plans(ws, x)
  assert report.fits and report.plans[0].recomputes
  assert report.plain_profile.peak_bytes == plain_peak > memory
  # `.lower` passes through like jax.jit's, with the fitted plans and the donation.
  mem = fitted.lower(ws, x).compile().memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes \
      - mem.alias_size_in_bytes
  assert peak == report.profile.peak_bytes <= memory and mem.alias_size_in_bytes > 0
  # Calling it trains exactly like the plain step.
  want = remat.jit(sgd_step(plain_plan(D)))(*args())
  got = fitted(ws, x)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  assert "remat.fit" in str(report) and "chain 0" in str(report)
  assert report.compiles <= 12  # the default max_compiles


@pytest.mark.parametrize("max_compiles", [2, 4])
def test_fit_compiles_the_step_at_most_max_compiles_times(max_compiles):
  memory = int(0.6 * peak_of(plain_plan(D))[0])
  report = remat.fit(sgd_step(S.auto()), memory, donate_argnums=0, max_compiles=max_compiles).plans(
      *args())
  assert report.fits and report.compiles <= max_compiles


# -- never worse than uniform ------------------------------------------------------------

HB, HW = 2048, 64


def wide(p, x):
  """A layer that keeps much more than its input: 64 -> 512 -> 64."""
  return jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"])


def sine(s, x):
  return jnp.sin(x) * s


HETERO = [wide if i % 3 == 0 else sine for i in range(12)]


def hetero_args():
  ps = [{"a": jnp.full((HW, 8 * HW), 0.02), "b": jnp.full((8 * HW, HW), 0.02)} if f is wide
        else jnp.float32(0.9) for f in HETERO]
  return ps, jnp.ones((HB, HW))


@pytest.mark.slow
@pytest.mark.parametrize("seg", [S.every(2), S.every(3), S.revolve(4)], ids=repr)
def test_fit_is_never_worse_than_a_uniform_plan(seg):
  step = lambda s: remat.jit(sgd_step(s, HETERO), donate_argnums=0)  # noqa: E731
  uniform = remat.profile(step(seg), *hetero_args())
  report = remat.fit(sgd_step(S.auto(), HETERO), uniform.peak_bytes, donate_argnums=0).plans(
      *hetero_args())
  assert report.profile.peak_bytes <= uniform.peak_bytes
  assert report.profile.flops <= uniform.flops * (1 + 1e-6)


@pytest.mark.slow
def test_fit_plans_flax_sequentials_and_shares_memory_between_chains():
  """An encoder and a decoder (linen Sequentials of Dense+tanh blocks) share the memory."""
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.tanh(nn.Dense(x.shape[-1])(x))

  class EncDec(nn.Module):
    seg: object

    @nn.compact
    def __call__(self, x):
      x = remat.linen.Sequential([Block() for _ in range(8)], segmenter=self.seg, name="encoder")(x)
      return remat.linen.Sequential([Block() for _ in range(8)], segmenter=self.seg, name="decoder")(x)

  x = jnp.ones((B, W))
  v = EncDec(S.every(1)).init(jax.random.key(0), x)
  opt = optax.sgd(0.1)

  def make(seg):
    def step(v, state, x):
      loss, g = jax.value_and_grad(lambda v: jnp.mean(EncDec(seg).apply(v, x) ** 2))(v)
      u, state = opt.update(g, state, v)
      return optax.apply_updates(v, u), state, loss
    return step

  st = opt.init(v)
  plain = remat.profile(remat.jit(make(None), donate_argnums=(0, 1)), v, st, x)
  every2 = remat.profile(remat.jit(make(S.every(2)), donate_argnums=(0, 1)), v, st, x)
  memory = every2.peak_bytes
  report = remat.fit(make(S.auto()), memory, donate_argnums=(0, 1)).plans(v, st, x)
  assert len(report.plans) == 2 and report.fits
  assert report.profile.flops <= every2.flops * (1 + 1e-6) < plain.flops * 1.5
  with pytest.raises(ValueError, match=r"`remat.segmenters.auto\(\)` chains are planned by `remat.fit`"):
    EncDec(S.auto()).apply(v, x)


# -- errors --------------------------------------------------------------------------------


def test_fit_names_the_smallest_peak_and_what_it_holds():
  # Above what arguments and outputs hold (1.25 MiB, parameters donated), below the smallest peak.
  fitted = remat.fit(sgd_step(S.auto()), 1_400_000, donate_argnums=0)
  with pytest.raises(ValueError) as e:
    fitted.plans(*args())
  msg = str(e.value)
  assert "`remat.fit`: the step does not fit 1.34 MiB (1,400,000 bytes) per device" in msg
  assert "smallest-memory plan" in msg and "arguments" in msg and "temporaries" in msg
  assert "raise `memory`" in msg
  assert "donate" not in msg.split("working memory).")[1]  # x is not donated, but no output is like it


def test_fit_refuses_after_one_lowering_when_arguments_alone_exceed_the_memory(monkeypatch):
  compiled = []
  no_compile = lambda *a, **k: compiled.append(a) or pytest.fail("compiled")  # noqa: E731
  monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
  ws, x = args()
  every_arg = remat.fit(lambda ws, x: sgd_step(S.auto())(ws, x), 100_000, donate_argnums=(0, 1))
  with pytest.raises(ValueError) as e:
    every_arg.plans(ws, x)
  msg = str(e.value)
  assert "cannot fit 97.66 KiB (100,000 bytes) per device" in msg and "without compiling" in msg
  assert "recomputation cannot lower that" in msg and "raise `memory`" in msg
  assert "donate" not in msg.split("without compiling")[1]  # everything is donated already: not advised
  some = remat.fit(sgd_step(S.auto()), 100_000, donate_argnums=1)  # the batch, not the parameters
  with pytest.raises(ValueError, match=r"without compiling.*donate what the step replaces "
                     r"\(`donate_argnums`: 16 argument array\(s\) not donated have the shape of an output\)"):
    some.plans(ws, x)
  assert compiled == []


def test_fit_warns_when_the_step_has_no_auto_chain():
  every2 = remat.fit(sgd_step(S.every(2)), "1GiB", donate_argnums=0)
  with pytest.warns(remat.FitWarning, match=r"no chain built with `remat.segmenters.auto\(\)`"):
    report = every2.plans(*args())
  assert report.fits and report.plans == ()


def test_fit_takes_memory_as_a_float():
  assert remat.fit(sgd_step(S.auto()), 1.5e9).memory == 1_500_000_000
  assert remat.fit(sgd_step(S.auto()), 2.0**30).memory == 2**30


def test_fit_argument_errors():
  step = sgd_step(S.auto())
  for bad in (0, -5, "lots", "12 parsecs", True, None, 0.5, float("nan"), float("inf"), -1e9):
    with pytest.raises(ValueError, match=r"the `memory` argument to `remat.fit`"):
      remat.fit(step, bad)
  assert remat.fit(step, "1.5GiB").memory == int(1.5 * 2**30)
  assert remat.fit(step, "80GB").memory == 80 * 10**9
  with pytest.raises(TypeError, match=r"`remat.fit` compiles the step itself.*donate_argnums"):
    remat.fit(jax.jit(step), "1GiB")
  with pytest.raises(ValueError, match=r"`max_compiles`.*>= 2"):
    remat.fit(step, "1GiB", max_compiles=1)
  with pytest.raises(ValueError, match=r"chains are planned by `remat.fit`.*budget\(max_bytes\)"):
    remat.jit(step)(*args())
  # Arguments and outputs (16 KiB) fit, the sort's 16 KiB temporary does not.
  no_chain = remat.fit(lambda x: jnp.sort(jnp.tanh(x @ x.T), axis=0).sum(), 20_000)
  with pytest.raises(ValueError, match=r"no `remat.segmenters.auto\(\)` chain to plan"):
    with pytest.warns(remat.FitWarning):
      no_chain.plans(jnp.ones((64, 64)))


def test_plans_and_reports_count_recomputation_inside_blocks():
  # A block taped under a policy recomputes part of its forward pass: the counts say so.
  from remat.segmenters import Segment
  tree = Segment(0, 3, (Segment(0, 2, policy="dots"), Segment(2, 3)))
  plan = Plan.from_tree(tree)
  assert plan.recomputed_evaluations == 0 and plan.policy_layers == 2 and plan.recomputes
  assert plan.recomputation() == "0 recomputed, 2 layer(s) recomputing part of their forward under a policy"
  assert "(0 recomputed, 2 layer(s) recomputing part" in str(plan).splitlines()[0]


def test_fit_runs_and_lowers_with_the_executable_its_search_compiled(monkeypatch, caplog):
  """After the search, calling the step or `.lower(...).compile()` compiles nothing again; the search
  says what it compiles through the `remat` logger."""
  import logging

  ws, x = args()
  fitted = remat.fit(sgd_step(S.auto()), int(0.6 * peak_of(plain_plan(D))[0]), donate_argnums=1)
  with caplog.at_level(logging.INFO, logger="remat"):
    report = fitted.plans(ws, x)
  lines = [r.getMessage() for r in caplog.records if r.name == "remat"]
  assert sum("started" in m for m in lines) == report.compiles >= 2
  assert any("compile 1 (plain): peak" in m and "(over)" in m for m in lines)
  compiles = []
  real = jax.stages.Lowered.compile
  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **k: compiles.append(1) or real(
      self, *a, **k))
  assert remat.Profile.from_compiled(fitted.lower(ws, x).compile()).peak_bytes == report.profile.peak_bytes
  new_ws, loss = fitted(ws, x)
  ref_ws, ref_loss = jax.jit(sgd_step(plain_plan(D)))(ws, x)
  chex.assert_trees_all_close((new_ws, loss), (ref_ws, ref_loss), rtol=1e-5, atol=1e-6)
  assert compiles == []
