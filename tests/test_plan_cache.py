"""The persistent plan cache: reused across `remat.fit` objects and processes, never trusted blindly."""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

import remat
from remat import segmenters as S
from remat._src.fitting import budget as budget_lib
from remat._src.measure import costs as costs_lib
from remat._src.fitting import fit as fit_lib
from remat._src.measure import plan_cache
from remat._src.measure import profile as profile_lib

D, B, W = 8, 256, 64


def layer(w, x):
  return jnp.tanh(x @ w)


APPLY = remat.sequential([layer] * D, S.auto())


def step(ws, x):
  loss, g = jax.value_and_grad(lambda ws: jnp.mean(APPLY(ws, x) ** 2))(ws)
  return [w - 0.1 * d for w, d in zip(ws, g, strict=True)], loss


def args():
  ws = [jax.random.normal(jax.random.key(i), (W, W)) / W ** 0.5 for i in range(D)]
  return ws, jax.random.normal(jax.random.key(99), (B, W))


MEMORY = 560_000  # 70% of the plain step's peak (802,892 bytes)


@pytest.fixture
def cache(tmp_path):
  plan_cache._warned.clear()
  remat.set_plan_cache_dir(tmp_path)
  yield tmp_path
  remat.set_plan_cache_dir(None)
  plan_cache._dir_override = plan_cache._UNSET


def fit_files(root):
  return sorted(p for p in os.listdir(root) if p.startswith("fit-"))


def test_a_second_fit_compiles_the_cached_plans_once(cache):
  first = remat.fit(step, MEMORY, donate_argnums=0).plans(*args())
  assert first.fits and first.compiles > 1 and len(fit_files(cache)) == 1
  again = remat.fit(step, MEMORY, donate_argnums=0)
  report = again.plans(*args())
  assert report.compiles == 1 and report.plans == first.plans and report.profile == first.profile
  assert report.plain_profile == first.plain_profile
  _, loss = again(*args())  # runs with the executable of that one compile
  assert jnp.isfinite(loss)


def test_other_memory_or_layout_is_a_miss(cache):
  remat.fit(step, MEMORY, donate_argnums=0).plans(*args())
  other = remat.fit(step, MEMORY + 50_000, donate_argnums=0).plans(*args())
  assert other.compiles > 1 and len(fit_files(cache)) == 2
  ws, x = args()
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  sharded = remat.fit(step, MEMORY, donate_argnums=0).plans(ws, x)
  assert sharded.fits and len(fit_files(cache)) == 3  # a new entry: per device, plain fits on the mesh


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other version", "bad plans"])
def test_a_damaged_entry_is_ignored_with_one_warning(cache, damage):
  first = remat.fit(step, MEMORY, donate_argnums=0).plans(*args())
  (name,) = fit_files(cache)
  path = cache / name
  text = path.read_text()
  if damage == "garbage":
    path.write_bytes(b"\x00\xff not json")
  elif damage == "truncated":
    path.write_text(text[:len(text) // 2])
  elif damage == "other version":
    entry = json.loads(text)
    entry["key"] = entry["key"].replace(jax.__version__, "0.0.0")
    path.write_text(json.dumps(entry))
  else:
    entry = json.loads(text)
    entry["value"]["plans"] = [{"root": "nonsense"}]
    path.write_text(json.dumps(entry))
  with pytest.warns(remat.PlanCacheWarning, match="planning without it") as record:
    report = remat.fit(step, MEMORY, donate_argnums=0).plans(*args())
    remat.fit(step, MEMORY, donate_argnums=0).plans(*args())  # the same file: no second warning
  assert len([w for w in record if issubclass(w.category, remat.PlanCacheWarning)]) == 1
  assert report.plans == first.plans and report.compiles == first.compiles  # searched again


def test_a_cached_plan_that_no_longer_fits_is_searched_again(cache, monkeypatch):
  # One entry for every memory: the plans found for a large memory are offered to a smaller one.
  material = fit_lib._Search.material
  monkeypatch.setattr(fit_lib._Search, "material", lambda self: {**material(self), "memory": None})
  ws, x = args()
  roomy = remat.fit(step, 10 * MEMORY, donate_argnums=0).plans(ws, x)
  tight = remat.fit(step, MEMORY, donate_argnums=0).plans(ws, x)
  assert roomy.profile.peak_bytes > MEMORY >= tight.profile.peak_bytes and tight.compiles > 1


def test_budget_plans_and_layer_costs_are_cached(cache, monkeypatch):
  apply = remat.sequential([layer] * D, S.budget(400_000))
  ws, x = args()
  first = apply.plan_for(ws, x)
  budget_lib._VERIFIED.clear()
  costs_lib._CACHE.clear()
  compiles = []
  real = profile_lib.measure
  monkeypatch.setattr(profile_lib, "measure", lambda *a: compiles.append(1) or real(*a))
  again = apply.plan_for(ws, x)
  assert again.root == first.root and again.compiled_temp_bytes == first.compiled_temp_bytes
  assert len(compiles) == 1  # the cached plan, compiled once to check it; the costs come from disk


def test_the_cache_is_off_with_an_empty_directory(tmp_path, monkeypatch):
  plan_cache._dir_override = plan_cache._UNSET
  monkeypatch.setenv("REMAT_CACHE_DIR", "")
  assert remat.plan_cache_dir() is None
  monkeypatch.delenv("REMAT_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert remat.plan_cache_dir() == str(tmp_path / "remat")
  with pytest.raises(TypeError, match="set_plan_cache_dir"):
    remat.set_plan_cache_dir(3)


WRITER = """
import sys
from remat._src.measure import plan_cache
plan_cache.set_plan_cache_dir(sys.argv[1])
for i in range(60):
  plan_cache.store("fit", {"same": "key"}, {"writer": sys.argv[2], "i": i, "pad": "x" * 200_000})
"""


def test_concurrent_writers_leave_whole_entries(cache):
  procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(cache), str(k)]) for k in range(2)]
  seen = set()
  with warnings.catch_warnings():
    warnings.simplefilter("error", remat.PlanCacheWarning)
    while any(p.poll() is None for p in procs):
      value = plan_cache.load("fit", {"same": "key"})
      if value is not None:
        assert len(value["pad"]) == 200_000
        seen.add(value["writer"])
  assert all(p.returncode == 0 for p in procs)
  assert plan_cache.load("fit", {"same": "key"})["i"] == 59
  assert not [f for f in os.listdir(cache) if f.startswith(".")]  # no temporary file left behind
