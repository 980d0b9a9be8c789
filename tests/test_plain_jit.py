"""What a checkpoint saves under plain `jax.jit` and `nnx.jit`, and what `import remat` leaves alone.

remat sets no process-wide XLA flag (docs/facts.md, fact 24). Up to jax 0.11.0, XLA:CPU undoes a
checkpoint compiled by plain `jax.jit` (fact 1): it saves no memory there, and the first one traced
warns once, naming `remat.jit`, which keeps the saving per compile. From jax 0.11.1 XLA:CPU keeps
the barriers by itself (fact 20): plain `jax.jit` saves, and nothing warns.

Each case runs in a fresh Python process, so that what `import remat` does (or does not do) to the
environment is seen before jax starts its CPU backend. Every case prints the compiled temp memory
of the same small checkpointed chain; the plain (uncheckpointed) figure comes from the same
process, so the comparison is made at equal footing.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from remat._src.util import compat

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
  full_env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # as the root conftest.py sets it
  full_env.update(env or {})
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env=full_env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


PLAIN_JIT = CHAIN + """
import json, os, warnings
flags_before = os.environ["XLA_FLAGS"]
{imports}
import remat
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  plain = temp(jax.jit(step_of(segment)))
  ckpt = temp(jax.jit(step_of(remat.checkpoint(segment))))
  again = temp(jax.jit(step_of(remat.checkpoint(segment))))  # warned once only
  with_remat_jit = temp(remat.jit(step_of(remat.checkpoint(segment))))
msgs = [str(w.message) for w in caught if issubclass(w.category, remat.CpuFlagsWarning)]
print(json.dumps(dict(plain=plain, ckpt=ckpt, with_remat_jit=with_remat_jit, msgs=msgs,
                      flags_before=flags_before, flags=os.environ["XLA_FLAGS"], devices=jax.device_count())))
"""


@pytest.mark.parametrize("order", ["remat first", "jax first"])
def test_import_sets_no_flag_and_plain_jit_behaves_as_the_version_does(order):
  imports = "import flax.linen, flax.nnx; jax.devices()" if order == "jax first" else ""
  r = _run(PLAIN_JIT.format(imports=imports))
  assert r["flags"] == r["flags_before"] == "--xla_force_host_platform_device_count=8"  # untouched
  assert r["devices"] == 8
  assert r["plain"] >= 8.5, r  # all 8 activations and then some
  assert r["with_remat_jit"] <= 0.7 * r["plain"], r  # remat.jit saves on every version: 9 -> 6 act
  if compat.CPU_UNDOES_REMAT:  # jax <= 0.11.0: plain jax.jit undoes the checkpoint (fact 1) ...
    assert r["ckpt"] >= r["plain"] - 0.5, r
    assert len(r["msgs"]) == 1, r["msgs"]  # ... and says so once, with the fix
    assert "`remat.jit`" in r["msgs"][0] and "0.11.1" in r["msgs"][0]
  else:  # jax >= 0.11.1 keeps the barriers by itself (fact 20): a saving, and nothing to say
    assert r["ckpt"] <= 0.7 * r["plain"], r
    assert r["msgs"] == [], r["msgs"]


def test_the_users_own_xla_flags_keep_the_saving_under_plain_jit():
  # A user may choose the process-wide flags themselves (README: with both passes, fact 24).
  flags = ("--xla_force_host_platform_device_count=8 "
           "--xla_disable_hlo_passes=cse_barrier_expander,small-while-loop-hoisting")
  r = _run(PLAIN_JIT.format(imports=""), env={"XLA_FLAGS": flags})
  assert r["flags"] == flags and r["msgs"] == [], r
  assert r["ckpt"] <= 0.7 * r["plain"], r


def test_eager_and_remat_compiles_do_not_warn():
  code = CHAIN + """
import json, warnings
import remat
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  ws, x = [jnp.eye(W) * 0.9] * D, jnp.ones((B, W))
  jax.grad(lambda ws: jnp.sum(run(ws, x, remat.checkpoint(segment))))(ws)  # eager: keeps inputs only
  t = temp(remat.jit(step_of(remat.checkpoint(segment))))
  p = remat.profile(jax.jit(step_of(remat.checkpoint(segment))), ws, x).temp_bytes / ACT
print(json.dumps(dict(n=sum(issubclass(w.category, remat.CpuFlagsWarning) for w in caught), t=t, p=p)))
"""
  r = _run(code)
  assert r["n"] == 0 and r["t"] <= 7 and r["p"] <= 7, r  # plain: 9 activations


def test_nnx_jit_saves_from_jax_0_11_1_and_warns_before():
  code = NNX_CHAIN + """
import json, warnings
import remat

class CheckpointedSegment(Segment):
  @remat.nnx.checkpoint
  def __call__(self, x):
    return Segment.__call__(self, x)

with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  plain = temp(model_of(Segment))
  ckpt = temp(model_of(CheckpointedSegment))
print(json.dumps(dict(plain=plain, ckpt=ckpt,
                      n=sum(issubclass(w.category, remat.CpuFlagsWarning) for w in caught))))
"""
  r = _run(code)
  assert r["plain"] >= 8.5, r
  if compat.CPU_UNDOES_REMAT:
    assert r["n"] == 1 and r["ckpt"] >= r["plain"] - 0.5, r
  else:
    assert r["n"] == 0 and r["ckpt"] <= 0.7 * r["plain"], r
