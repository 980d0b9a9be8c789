"""Programs that `jax.checkpoint` accepts, for the do-no-harm tests (tests/test_do_no_harm.py).

XLA:CPU cannot emit an ``optimization_barrier`` inside a small loop body that it compiles as one
nested kernel (docs/facts.md, fact 24): with the barriers kept, such programs abort the process.
Each case here is a small scientific-JAX program of that kind (small carries, loops, conditionals,
custom rules, policies, first and second order, forward mode). The tests run every case in a fresh
process, three ways: with ``jax.checkpoint`` and remat never imported, with remat imported, and
with ``remat.checkpoint``, under plain ``jax.jit`` and under ``remat.jit``.

Run one case from the command line (this module imports remat only when asked to)::

  python tests/harm_cases.py CASE [--remat]

prints one JSON line: for each way of running, the case's outputs flattened to lists. Without
``--remat`` only ``jax.checkpoint`` under ``jax.jit`` runs, in a process that never imports remat.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CASES: dict[str, callable] = {}


def case(fn):
  CASES[fn.__name__] = fn
  return fn


# Each case takes `ckpt` (a checkpoint decorator taking `policy=`) and `jit` (a jit) and returns
# a pytree of arrays.


@case
def scan_matmul_2x2(ckpt, jit):
  f = ckpt(lambda w, x: jnp.tanh(x @ w))
  ws, x = jnp.ones((4, 2, 2)) * 0.3, jnp.ones((2, 2))
  loss = lambda ws, x: lax.scan(lambda c, w: (f(w, c), None), x, ws)[0].sum()
  return jit(jax.grad(loss, argnums=(0, 1)))(ws, x)


@case
def scan_sin_scalar(ckpt, jit):
  f = ckpt(lambda x: jnp.sin(jnp.sin(x)))
  loss = lambda x: lax.scan(lambda c, _: (f(c), c), x, None, length=5)[0]
  return jit(jax.value_and_grad(loss))(0.7)


@case
def euler_ode_2(ckpt, jit):
  def rhs(y, theta):
    return jnp.stack([y[1], -theta * jnp.sin(y[0])])

  step = ckpt(lambda y, theta: y + 0.05 * rhs(y, theta))

  def final(theta, y0):
    return lax.scan(lambda y, _: (step(y, theta), None), y0, None, length=50)[0]

  loss = lambda theta, y0: jnp.sum(final(theta, y0) ** 2)
  return jit(jax.grad(loss, argnums=(0, 1)))(1.3, jnp.array([0.4, 0.0]))


@jax.custom_jvp
def softplus(x):
  return jnp.logaddexp(x, 0.0)


softplus.defjvp(lambda primals, tangents: (softplus(primals[0]),
                                           tangents[0] * jax.nn.sigmoid(primals[0])))


@case
def second_order_dots_custom_jvp(ckpt, jit):
  f = ckpt(lambda w, x: softplus(x @ w), policy=jax.checkpoint_policies.dots_saveable)
  ws, x = jnp.ones((3, 2, 2)) * 0.2, jnp.ones((2,))
  loss = lambda ws, x: lax.scan(lambda c, w: (f(w, c), None), x, ws)[0].sum()
  g = lambda x: jax.grad(loss, argnums=1)(ws, x).sum()
  return jit(jax.grad(g))(x), jit(jax.hessian(lambda x: loss(ws, x)))(x)


@case
def fori_loop_scalar(ckpt, jit):
  f = ckpt(lambda x, a: jnp.cos(a * x) + x)
  loss = lambda a: lax.fori_loop(0, 6, lambda i, x: f(x, a), 0.1)
  return jit(jax.value_and_grad(loss))(0.9)


@case
def while_loop_jvp(ckpt, jit):
  f = ckpt(lambda x: jnp.tanh(x) * 1.5)

  def g(x):
    return lax.while_loop(lambda c: c[0] < 7, lambda c: (c[0] + 1, f(c[1])), (0, x))[1]

  x = jnp.array([0.3, -0.2])
  return jit(lambda x, t: jax.jvp(g, (x,), (t,)))(x, jnp.ones(2))


@case
def cond_inside_and_around(ckpt, jit):
  inner = ckpt(lambda x: lax.cond(x > 0, jnp.sin, jnp.cos, x))

  def body(c, _):
    return lax.cond(c > 0.5, lambda c: inner(c) * 0.9, lambda c: inner(c) + 0.1, c), None

  loss = lambda x: lax.scan(body, x, None, length=4)[0]
  return jit(jax.value_and_grad(loss))(0.8), jit(jax.grad(inner))(-0.3)


@jax.custom_vjp
def clip_gradient(x):
  return x


clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.5, 0.5),))


@case
def custom_vjp_inside(ckpt, jit):
  f = ckpt(lambda x, w: jnp.tanh(clip_gradient(x * w)) * 3.0)
  loss = lambda w: lax.scan(lambda c, _: (f(c, w), None), jnp.ones((2, 2)), None, length=3)[0].sum()
  return jit(jax.value_and_grad(loss))(jnp.full((2, 2), 0.7))


@case
def jvp_and_linearize(ckpt, jit):
  f = ckpt(lambda x: jnp.sin(jnp.sin(x)))
  g = lambda x: lax.scan(lambda c, _: (f(c), None), x, None, length=3)[0]
  y, out_t = jit(lambda x, t: jax.jvp(g, (x,), (t,)))(0.5, 1.0)
  y2, lin = jax.linearize(jit(g), 0.5)
  return y, out_t, y2, jit(lin)(2.0)


@case
def saved_names_policy(ckpt, jit):
  from jax.ad_checkpoint import checkpoint_name

  def layer(w, x):
    h = checkpoint_name(x @ w, "proj")
    return jnp.tanh(h) + x

  f = ckpt(layer, policy=jax.checkpoint_policies.save_only_these_names("proj"))
  loss = lambda ws, x: lax.scan(lambda c, w: (f(w, c), None), x, ws)[0].sum()
  return jit(jax.grad(loss))(jnp.ones((3, 2, 2)) * 0.1, jnp.ones((1, 2)))


@case
def nested_checkpoint_scan(ckpt, jit):
  inner = ckpt(lambda x: jnp.sin(x) * 1.1)
  outer = ckpt(lambda x: lax.scan(lambda c, _: (inner(c), None), x, None, length=3)[0])
  loss = lambda x: lax.scan(lambda c, _: (outer(c), None), x, None, length=2)[0].sum()
  return jit(jax.value_and_grad(loss))(jnp.array([0.2, 0.4]))


@case
def vmap_of_grad(ckpt, jit):
  f = ckpt(lambda x: jnp.tanh(x) ** 2)
  loss = lambda x: lax.scan(lambda c, _: (f(c), None), x, None, length=4)[0]
  return jit(jax.vmap(jax.grad(loss)))(jnp.linspace(-1.0, 1.0, 3))


@case
def scan_matmul_8x8(ckpt, jit):  # large enough that XLA:CPU emits the loop as a thunk loop
  f = ckpt(lambda w, x: jnp.tanh(x @ w))
  ws, x = jnp.ones((4, 8, 8)) * 0.1, jnp.ones((8, 8))
  loss = lambda ws, x: lax.scan(lambda c, w: (f(w, c), None), x, ws)[0].sum()
  return jit(jax.grad(loss, argnums=(0, 1)))(ws, x)


def _flat(tree) -> list:
  return [np.asarray(x, np.float64).ravel().tolist() for x in jax.tree.leaves(tree)]


def run(name: str, with_remat: bool) -> dict[str, list]:
  """The case's outputs, each way of running it that this process allows."""
  fn = CASES[name]
  out = {}
  if not with_remat:
    out["jax.checkpoint/jax.jit"] = _flat(fn(jax.checkpoint, jax.jit))
    return out
  import remat  # noqa: PLC0415 - the point of the test: imported only in this branch

  ways = {
      "jax.checkpoint/jax.jit": (jax.checkpoint, jax.jit),
      "jax.checkpoint/remat.jit": (jax.checkpoint, remat.jit),
      "remat.checkpoint/jax.jit": (remat.checkpoint, jax.jit),
      "remat.checkpoint/remat.jit": (remat.checkpoint, remat.jit),
  }
  for way, (ckpt, jit) in ways.items():
    out[way] = _flat(fn(ckpt, jit))
  return out


if __name__ == "__main__":
  print(json.dumps(run(sys.argv[1], "--remat" in sys.argv[2:])))
