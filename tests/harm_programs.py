"""Random small programs through ``remat.checkpoint`` and ``jax.checkpoint`` (tests/test_do_no_harm.py).

Hypothesis draws a program: a chain of elementwise and matmul ops on a value of some shape (a
scalar up to 8x8), optionally with a ``lax.scan``, a ``lax.cond`` or a ``custom_jvp`` inside, and
optionally scanned over itself a few steps (the small loops of docs/facts.md, fact 24). Each
program is checkpointed both ways and compiled both ways (``jax.jit``, ``remat.jit``); its value,
gradient and jvp must agree. Run as a script in a fresh process, so that an abort inside XLA ends
that process and fails one test, not the suite::

  python tests/harm_programs.py N

prints one line per program tried and a last JSON line with the count and any mismatch.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

SHAPES = [(), (2,), (2, 2), (3,), (3, 3), (8, 8)]
UNARY = ["sin", "tanh", "square", "scale", "shift", "gauss"]
STRUCT = ["matmul", "cond", "scan", "softplus"]


@jax.custom_jvp
def softplus(x):
  return jnp.logaddexp(x, 0.0)


softplus.defjvp(lambda p, t: (softplus(p[0]), t[0] * jax.nn.sigmoid(p[0])))


def _unary(op, x):
  return {"sin": jnp.sin, "tanh": jnp.tanh, "square": lambda x: x * x * 0.5,
          "scale": lambda x: x * 0.8, "shift": lambda x: x + 0.3,
          "gauss": lambda x: jnp.exp(-x * x)}[op](x)


def build(ops, shape):
  """The program ``ops`` on inputs of ``shape`` as ``f(w, x)``; ``w`` is a square weight."""

  def f(w, x):
    for op in ops:
      if op == "matmul":
        x = x @ w if len(shape) == 2 else x * jnp.sum(w) * 0.1
      elif op == "cond":
        x = lax.cond(jnp.sum(x) > 0, jnp.sin, jnp.cos, x)
      elif op == "scan":
        x = lax.scan(lambda c, _: (jnp.tanh(c) * 0.9 + 0.1, None), x, None, length=3)[0]
      elif op == "softplus":
        x = softplus(x)
      else:
        x = _unary(op, x)
    return x

  return f


def evaluate(f, ckpt, jit, outer, shape):
  g = ckpt(f)
  n = shape[-1] if len(shape) == 2 else 2

  def program(w, x):
    if outer:
      return lax.scan(lambda c, _: (g(w, c), None), x, None, length=outer)[0]
    return g(w, x)

  loss = lambda w, x: jnp.sum(program(w, x))
  w = jnp.eye(n) * 0.7 + 0.05
  x = jnp.linspace(-0.9, 0.8, int(np.prod(shape))).reshape(shape)

  def everything(w, x):
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(w, x)
    _, tangent = jax.jvp(program, (w, x), (jnp.ones_like(w), jnp.ones_like(x)))
    return value, grads, tangent

  return [np.asarray(a, np.float64) for a in jax.tree.leaves(jit(everything)(w, x))]


def main(n: int) -> dict:
  import remat  # noqa: PLC0415

  tried, mismatches = [], []

  @settings(max_examples=n, derandomize=True, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(ops=st.lists(st.sampled_from(UNARY + STRUCT), min_size=1, max_size=5),
         shape=st.sampled_from(SHAPES), outer=st.sampled_from([0, 2, 4]))
  def one(ops, shape, outer):
    name = f"{'+'.join(ops)} on {shape}, outer scan {outer}"
    print(name, flush=True)  # the last line printed names a program that aborted
    f = build(ops, shape)
    want = evaluate(f, jax.checkpoint, jax.jit, outer, shape)
    for ckpt_name, ckpt in (("jax.checkpoint", jax.checkpoint), ("remat.checkpoint", remat.checkpoint)):
      for jit_name, jit in (("jax.jit", jax.jit), ("remat.jit", remat.jit)):
        got = evaluate(f, ckpt, jit, outer, shape)
        ok = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want, strict=True))
        if not ok:
          mismatches.append(f"{name}: {ckpt_name} under {jit_name}")
    tried.append(name)

  one()
  return {"tried": len(tried), "distinct": len(set(tried)), "mismatches": mismatches}


if __name__ == "__main__":
  print(json.dumps(main(int(sys.argv[1]))))
