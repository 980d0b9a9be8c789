"""The tangent map of a checkpointed function: one linear primitive, two directions.

``jax.custom_vjp`` gives a function a backward rule only: its forward-mode
derivative is a ``custom_lin`` equation that may be transposed (reverse mode)
but never evaluated, so ``jax.jvp``, ``jax.linearize`` and ``jax.jacfwd`` of a
custom_vjp function fail, also when the call was staged out earlier (under
``jit``, ``scan``, ``while_loop``), where nothing at call time can tell the two
directions apart. ``remat.checkpoint`` is therefore a ``jax.custom_jvp`` whose
rule runs the checkpoint's forward pass (the residuals: the inputs, or what the
policy saves, possibly in host memory) and returns its output tangent as one
``remat_tangent`` equation, linear in the input tangents:

* **transposed** (``jax.grad``, ``jax.vjp``): the rule is the checkpoint's
  backward pass (barrier over residuals and cotangent, recompute, ``jax.vjp``),
  the same code ``custom_vjp`` ran; only the residuals cross from the forward
  to the backward pass, so memory and recomputation are unchanged;
* **evaluated** (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``): the rule
  recomputes the function under ``jax.jvp`` from the residuals.

It also has a JVP rule (forward over forward) and a batching rule (``vmap``,
``jacfwd``). The primitive is built with jax's extension API (``jax.extend`` and
``jax.interpreters``); its parameters carry one :class:`TangentMap`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero, zero_from_primal
from jax.extend.core import Literal, Primitive
from jax.interpreters import ad, batching, mlir


class TangentMap:
  """How to evaluate and to transpose one linear map ``tangents -> output tangents``.

  Attributes:
    num_res: how many of the primitive's operands are residuals (the rest are
      the linear inputs).
    forward: ``(res, tangents) -> out_tangents`` (lists of arrays).
    backward: ``(res, cotangents) -> in_cotangents`` (lists of arrays), the
      transpose of ``forward`` in its second argument.
    out_avals: the avals of the output tangents.

  Compared and hashed by identity (it is a primitive parameter).
  """

  def __init__(self, *, num_res: int, forward: Callable, backward: Callable,
               out_avals: Sequence[Any], name: str = "fn"):
    self.num_res = num_res
    self.forward = forward
    self.backward = backward
    self.out_avals = tuple(out_avals)
    self.name = name

  def __repr__(self):
    return f"TangentMap({self.name})"

  def batched(self, res_dims: Sequence[int | None], size: int, res, tangents) -> "TangentMap":
    """The same map over a leading batch axis of every tangent (residual axes ``res_dims``)."""
    res_dims = list(res_dims)

    def forward(r, t):
      return jax.vmap(self.forward, in_axes=(res_dims, 0), axis_size=size)(list(r), list(t))

    def backward(r, ct):
      return jax.vmap(self.backward, in_axes=(res_dims, 0), axis_size=size)(list(r), list(ct))

    out = jax.eval_shape(forward, list(res), list(tangents))
    return TangentMap(num_res=self.num_res, forward=forward, backward=backward,
                      out_avals=[jax.typeof(o) for o in out], name=self.name)


def jvp_tangents(fn: Callable, primals: Sequence[Any], tangents: Sequence[Any]) -> list[Any]:
  """The output tangents of ``jax.jvp(fn, primals, tangents)``, without the work they do not need.

  ``jax.jvp`` also computes the primal outputs. Staged under ``jit`` XLA drops
  what nothing uses, but the linear function of an eager ``jax.linearize``
  runs equation by equation: a checkpointed ``sin(sin(x))`` would evaluate
  ``sin`` twice where ``jax.checkpoint``'s linearization evaluates it once.
  So the jvp is traced, the equations that feed no tangent are dropped, and
  the rest is evaluated.
  """
  primals, tangents = list(primals), list(tangents)
  closed = jax.make_jaxpr(lambda p, t: jax.jvp(fn, p, t)[1])(primals, tangents)
  jaxpr = _without_dead_equations(closed.jaxpr)
  return jax.core.eval_jaxpr(jaxpr, closed.consts, *jax.tree_util.tree_leaves((primals, tangents)))


def _without_dead_equations(jaxpr):
  """``jaxpr`` less the top-level equations whose outputs nothing reads (effects are kept)."""
  live = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if not isinstance(v, Literal))
  return jaxpr.replace(eqns=kept[::-1])


def tangent_call(tmap: TangentMap, res: Sequence[Any], tangents: Sequence[Any]) -> list[Any]:
  """``tmap.forward(res, tangents)``, as one equation that transposes to ``tmap.backward``."""
  if len(res) != tmap.num_res:
    raise ValueError(f"internal error: {len(res)} residuals for a map over {tmap.num_res}")
  return tangent_p.bind(*res, *tangents, tmap=tmap)


### Rules

tangent_p = Primitive("remat_tangent")
tangent_p.multiple_results = True


def _split(args, tmap):
  return list(args[:tmap.num_res]), list(args[tmap.num_res:])


def _impl(*args, tmap):
  res, tangents = _split(args, tmap)
  return list(tmap.forward(res, tangents))


def _abstract_eval(*args, tmap):
  del args
  return list(tmap.out_avals)


def _jvp(primals, tangents, *, tmap):
  # Linear in the tangent operands, not in the residuals: differentiate the forward rule.
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  out, out_dot = jax.jvp(lambda *a: _impl(*a, tmap=tmap), list(primals), tangents)
  return out, out_dot


def _transpose(cts, *args, tmap):
  res, tangents = _split(args, tmap)
  if any(ad.is_undefined_primal(r) for r in res):
    raise NotImplementedError(
        f"`remat.checkpoint` of {tmap.name!r}: the tangent map was transposed with respect to "
        "its residuals; this cannot happen for a map built by `remat.checkpoint`.")
  cts = [ad.instantiate_zeros(ct) for ct in cts]
  in_cts = list(tmap.backward(res, cts))
  return [None] * len(res) + [ct if ad.is_undefined_primal(t) else None
                              for t, ct in zip(tangents, in_cts, strict=True)]


def _batch(args, dims, *, tmap):
  size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
  res, tangents = _split(args, tmap)
  res_dims, tan_dims = _split(dims, tmap)
  tangents = [batching.bdim_at_front(t, d, size) for t, d in zip(tangents, tan_dims, strict=True)]
  btmap = tmap.batched(res_dims, size, res, tangents)
  out = tangent_p.bind(*res, *tangents, tmap=btmap)
  return out, [0] * len(out)


tangent_p.def_impl(_impl)
tangent_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[tangent_p] = _jvp
ad.primitive_transposes[tangent_p] = _transpose
batching.primitive_batchers[tangent_p] = _batch
mlir.register_lowering(tangent_p, mlir.lower_fun(_impl, multiple_results=True))


### A custom_jvp function from a vjp pair


def custom_jvp_of(primal: Callable, fwd: Callable, bwd: Callable, jvp_from_residuals: Callable, *,
                  name: str) -> Callable:
  """``primal`` as a ``jax.custom_jvp`` function whose derivatives come from a vjp pair.

  ``fwd(primals) -> (outputs, residuals, extra)`` runs the forward pass and
  keeps what the backward needs; ``bwd(residuals, output_cotangents, extra)``
  returns the input cotangents; ``jvp_from_residuals(residuals, input_tangents,
  output_avals)`` the output tangents. The jvp rule runs ``fwd`` and returns
  the tangents through one linear ``TangentMap`` call whose transpose is
  ``bwd``, so reverse mode sees the vjp pair (and the residuals it keeps), and
  forward mode sees only the tangent map. Zero tangents stay symbolic; integer
  and key inputs get ``float0`` tangents.
  """

  @jax.custom_jvp
  def call(*flat):
    return primal(*flat)

  def rule(primals, tangents):
    out, res, extra = fwd(primals)
    in_nz = [not isinstance(t, SymbolicZero) and _tangent_dtype(t) != jax.dtypes.float0
             for t in tangents]
    out_avals = [jax.typeof(o).to_tangent_aval() for o in out]
    out_nz = [a.dtype != jax.dtypes.float0 for a in out_avals]
    if not any(in_nz) or not any(out_nz):
      return out, [zero_from_primal(o, symbolic_zeros=True) for o in out]
    in_avals = [jax.typeof(p).to_tangent_aval() for p in primals]
    res_leaves, res_tree = jax.tree_util.tree_flatten(res)

    def full(values, nz, avals):
      it = iter(values)
      return [next(it) if z else _zeros(a) for z, a in zip(nz, avals, strict=True)]

    def forward(res_leaves, nz_tangents):
      res = jax.tree_util.tree_unflatten(res_tree, res_leaves)
      out_dot = jvp_from_residuals(res, full(nz_tangents, in_nz, in_avals), out_avals)
      return [t for t, z in zip(out_dot, out_nz, strict=True) if z]

    def backward(res_leaves, nz_cts):
      res = jax.tree_util.tree_unflatten(res_tree, res_leaves)
      in_cts = bwd(res, full(nz_cts, out_nz, out_avals), extra)
      return [c for c, z in zip(in_cts, in_nz, strict=True) if z]

    tmap = TangentMap(
        num_res=len(res_leaves), forward=forward, backward=backward, name=name,
        out_avals=[a for a, z in zip(out_avals, out_nz, strict=True) if z])
    nz_out = iter(tangent_call(
        tmap, res_leaves, [t for t, z in zip(tangents, in_nz, strict=True) if z]))
    out_dot = [next(nz_out) if z else zero_from_primal(o, symbolic_zeros=True)
               for o, z in zip(out, out_nz, strict=True)]
    return out, out_dot

  call.defjvp(rule, symbolic_zeros=True)
  return call


def _tangent_dtype(t):
  return getattr(t, "dtype", None)


def _zeros(aval):
  """A concrete zero tangent for ``aval`` (``float0`` for integer and key inputs)."""
  if aval.dtype == jax.dtypes.float0:
    return np.zeros(aval.shape, jax.dtypes.float0)
  return jnp.zeros(aval.shape, aval.dtype)
