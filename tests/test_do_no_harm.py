"""Importing or using remat never breaks a program that works without it (docs/facts.md, fact 24).

Every program runs in a fresh process: an abort inside XLA (exit -6) then fails one test instead of
ending the suite. Each case of tests/harm_cases.py runs in a process that never imports remat
(`jax.checkpoint` under `jax.jit`) and in one that does (`jax.checkpoint` and `remat.checkpoint`,
under `jax.jit` and `remat.jit`); the results must agree. tests/harm_programs.py does the same
for programs drawn by hypothesis.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harm_cases  # noqa: E402


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # as the root conftest.py sets it
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        timeout=timeout, cwd=os.path.dirname(HERE))


def _last_json(out: subprocess.CompletedProcess, what: str) -> dict:
  assert out.returncode == 0, (
      f"{what} ended with exit status {out.returncode} (-6 or 134: XLA aborted the process):\n"
      f"{out.stdout[-1500:]}\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(harm_cases.CASES))
def test_case_runs_the_same_with_remat(name):
  script = os.path.join(HERE, "harm_cases.py")
  without = _last_json(_python(script, name), f"{name} without remat")
  with_remat = _last_json(_python(script, name, "--remat"), f"{name} with remat imported")
  want = without["jax.checkpoint/jax.jit"]
  # Importing remat changes nothing: the same program compiles to the same bits.
  assert with_remat["jax.checkpoint/jax.jit"] == want
  for way, got in with_remat.items():
    assert len(got) == len(want), way
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{name}: {way}")


IMPORT_CHANGES_NOTHING = """
import hashlib, json, os, sys
before = dict(os.environ)
if sys.argv[1] == "remat":
  import remat
import jax, jax.numpy as jnp
from jax import lax
config = {k: str(getattr(jax.config, k)) for k in ("jax_enable_x64", "jax_default_matmul_precision",
                                                   "jax_numpy_rank_promotion", "jax_platforms")}
f = jax.checkpoint(lambda w, x: jnp.tanh(x @ w))
loss = lambda ws, x: lax.scan(lambda c, w: (f(w, c), None), x, ws)[0].sum()
hlo = jax.jit(jax.grad(loss)).lower(jnp.ones((4, 2, 2)), jnp.ones((2, 2))).compile().as_text()
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps(dict(changed=changed, config=config, hlo=hashlib.sha256(hlo.encode()).hexdigest())))
"""


def test_import_changes_no_environment_config_or_compiled_program():
  without = _last_json(_python("-c", IMPORT_CHANGES_NOTHING, "plain"), "without remat")
  with_remat = _last_json(_python("-c", IMPORT_CHANGES_NOTHING, "remat"), "with remat")
  assert with_remat["changed"] == [] and without["changed"] == []
  assert with_remat["config"] == without["config"]
  assert with_remat["hlo"] == without["hlo"]  # the optimized program, to the byte


@pytest.mark.slow
def test_random_programs_agree_and_never_abort():
  r = _last_json(_python(os.path.join(HERE, "harm_programs.py"), "40", timeout=900), "random programs")
  assert r["tried"] == 40 and r["distinct"] >= 30, r
  assert r["mismatches"] == [], r["mismatches"]
