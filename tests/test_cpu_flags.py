"""`import remat` keeps checkpoints under plain `jax.jit` and `nnx.jit` on CPU (docs/facts.md, fact 14).

Each case runs in a fresh Python process, because XLA reads `XLA_FLAGS` once, when jax starts its
CPU backend, and this test process started it long ago. Every case prints the compiled temp memory
of the same small checkpointed chain; the plain (uncheckpointed) figure comes from the same
process, so the comparison is made at equal footing.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from remat._src import compat
from remat._src import compile as compile_lib

# 8 layers tanh(x @ w) on a 256 x 128 batch (one activation = 128 KiB), in 2 checkpointed segments
# of 4. The plain step keeps 9 activations, the checkpointed one 6 with the barriers, 10 without.
CHAIN = """
import jax, jax.numpy as jnp
D, B, W = 8, 256, 128
ACT = B * W * 4

def segment(ws, x):
  for w in ws:
    x = jnp.tanh(x @ w)
  return x

def run(ws, x, seg):
  return seg(ws[4:], seg(ws[:4], x))

def step_of(seg):
  return jax.value_and_grad(lambda ws, x: jnp.mean(run(ws, x, seg) ** 2))

def temp(jitted):  # arrays made here: defining the chain must not start jax's backend
  ws, x = [jnp.eye(W) * 0.9] * D, jnp.ones((B, W))
  return jitted.lower(ws, x).compile().memory_analysis().temp_size_in_bytes / ACT
"""

NNX_CHAIN = """
import jax, jax.numpy as jnp
from flax import nnx
D, B, W = 8, 256, 128
ACT = B * W * 4

class Block(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(W, W, rngs=rngs)
  def __call__(self, x):
    return jnp.tanh(self.linear(x))

class Segment(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([Block(rngs) for _ in range(4)])
  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return x

def model_of(segment_cls):
  rngs = nnx.Rngs(0)
  return nnx.List([segment_cls(rngs) for _ in range(2)])

def loss(model, x):
  for s in model:
    x = s(x)
  return jnp.mean(x ** 2)

step = nnx.jit(nnx.value_and_grad(loss))
temp = lambda model: step.lower(model, jnp.ones((B, W))).compile().memory_analysis().temp_size_in_bytes / ACT
"""


def _run(code: str, env: dict | None = None) -> dict:
  full_env = dict(os.environ)
  full_env.pop("REMAT_NO_XLA_FLAGS", None)
  full_env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # as the root conftest.py sets it
  full_env.update(env or {})
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env=full_env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


PLAIN_JIT = CHAIN + """
import json, os, warnings
warnings.simplefilter("error")  # no warning in the ordinary case
{imports}
import remat
plain = temp(jax.jit(step_of(segment)))
ckpt = temp(jax.jit(step_of(remat.checkpoint(segment))))
print(json.dumps(dict(plain=plain, ckpt=ckpt, flags=os.environ["XLA_FLAGS"], devices=jax.device_count(),
                      state=remat._compile._state["xla_flags"])))
"""


@pytest.mark.parametrize("order", ["remat first", "jax first"])
def test_plain_jax_jit_keeps_the_saving(order):
  # remat imported before or after jax (and flax), as long as the backend has not started.
  imports = "import flax.linen, flax.nnx" if order == "jax first" else ""
  r = _run(PLAIN_JIT.format(imports=imports))
  assert r["state"] == "added"
  assert "--xla_force_host_platform_device_count=8" in r["flags"] and r["devices"] == 8  # kept
  assert r["flags"].endswith("--xla_disable_hlo_passes=cse_barrier_expander")
  assert r["plain"] >= 8.5, r  # all 8 activations and then some
  assert r["ckpt"] <= 0.7 * r["plain"], r  # measured: 9.0 -> 6.0 activations (10.0 without the flag)


def test_opting_out_leaves_xla_flags_alone_and_plain_jit_undoes_checkpoints():
  # The control: without the flag, XLA:CPU undoes the checkpoint (so the test above can fail).
  r = _run(PLAIN_JIT.format(imports=""), env={"REMAT_NO_XLA_FLAGS": "1"})
  assert r["state"] == "opted out"
  assert r["flags"] == "--xla_force_host_platform_device_count=8"
  if compat.CPU_UNDOES_REMAT:
    assert r["ckpt"] >= r["plain"] - 0.5, r  # no saving: fact 1
  else:
    assert r["ckpt"] <= 0.7 * r["plain"], r  # jax >= 0.11.1 keeps the barriers itself: fact 20


def test_existing_disabled_passes_are_merged():
  code = CHAIN + """
import json, os, remat
ckpt = temp(jax.jit(step_of(remat.checkpoint(segment))))
print(json.dumps(dict(flags=os.environ["XLA_FLAGS"], ckpt=ckpt)))
"""
  user_flags = "--xla_disable_hlo_passes=rematerialization --xla_cpu_enable_fast_math=false"
  r = _run(code, env={"XLA_FLAGS": user_flags})
  assert r["flags"] == ("--xla_disable_hlo_passes=rematerialization,cse_barrier_expander "
                        "--xla_cpu_enable_fast_math=false")
  assert r["ckpt"] <= 7, r  # plain: 9 activations


def test_nnx_jit_keeps_the_saving():
  code = NNX_CHAIN + """
import json, warnings
warnings.simplefilter("error")
import remat

class CheckpointedSegment(Segment):
  @remat.nnx.checkpoint
  def __call__(self, x):
    return Segment.__call__(self, x)

plain = temp(model_of(Segment))
ckpt = temp(model_of(CheckpointedSegment))
print(json.dumps(dict(plain=plain, ckpt=ckpt)))
"""
  r = _run(code)
  assert r["plain"] >= 8.5, r
  assert r["ckpt"] <= 0.7 * r["plain"], r


LATE = CHAIN + """
import json, warnings
jax.devices()  # the CPU backend starts (and reads XLA_FLAGS) before remat is imported
import remat
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  plain = temp(jax.jit(step_of(segment)))
  ckpt = temp(jax.jit(step_of(remat.checkpoint(segment))))
  again = temp(jax.jit(step_of(remat.checkpoint(segment))))  # warned once only
  with_options = temp(remat.jit(step_of(remat.checkpoint(segment))))
msgs = [str(w.message) for w in caught if issubclass(w.category, remat.CpuFlagsWarning)]
print(json.dumps(dict(plain=plain, ckpt=ckpt, with_options=with_options, msgs=msgs,
                      state=remat._compile._state["xla_flags"])))
"""


def test_late_import_warns_once_with_the_fix():
  r = _run(LATE)
  assert r["state"] == "too late"
  if not compat.CPU_UNDOES_REMAT:  # jax >= 0.11.1: nothing to warn about (fact 20)
    assert r["msgs"] == [] and r["ckpt"] <= 0.7 * r["plain"], r
    return
  assert len(r["msgs"]) == 1, r["msgs"]
  msg = r["msgs"][0]
  assert "import remat" in msg and "XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander" in msg
  assert "`remat.jit`" in msg
  assert r["ckpt"] >= r["plain"] - 0.5, r  # what the warning is about: no saving under jax.jit
  assert r["with_options"] <= 0.7 * r["plain"], r  # remat.jit still saves


def test_late_import_under_remat_jit_does_not_warn():
  code = CHAIN + """
import json, warnings
jax.devices()
import remat
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  t = temp(remat.jit(step_of(remat.checkpoint(segment))))
print(json.dumps(dict(n=sum(issubclass(w.category, remat.CpuFlagsWarning) for w in caught), t=t)))
"""
  r = _run(code)
  assert r["n"] == 0 and r["t"] <= 7, r  # plain: 9 activations


def test_flag_merging():
  f = compile_lib.flags_with_barrier_pass
  assert f("") == "--xla_disable_hlo_passes=cse_barrier_expander"
  assert f("--a=1  --b") == "--a=1 --b --xla_disable_hlo_passes=cse_barrier_expander"
  assert f("--xla_disable_hlo_passes=x --xla_disable_hlo_passes=y") == (
      "--xla_disable_hlo_passes=x --xla_disable_hlo_passes=y,cse_barrier_expander")
  once = f("--xla_disable_hlo_passes=cse_barrier_expander,z")
  assert once == "--xla_disable_hlo_passes=cse_barrier_expander,z" and f(once) == once


def test_install_on_a_given_environment(monkeypatch):
  monkeypatch.setattr(compile_lib, "_state", dict(compile_lib._state))  # this process's state stays
  jax.devices()  # this process's backend has started: too late, and nothing is changed
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert compile_lib.install_xla_flags(env) == "too late"
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  env = {"XLA_FLAGS": "", "REMAT_NO_XLA_FLAGS": "1"}
  assert compile_lib.install_xla_flags(env) == "opted out" and env["XLA_FLAGS"] == ""
  env = {"XLA_FLAGS": "--xla_disable_hlo_passes=cse_barrier_expander"}
  assert compile_lib.install_xla_flags(env) == "present"
