"""Per-layer costs measured from XLA: boundary bytes, kept bytes, transient bytes, flops.

Residual sizes read from the jaxpr mislead (XLA fuses elementwise chains and
drops duplicated values; docs/facts.md, fact 7). Each *distinct* layer (same
computation, same shapes) is calibrated with small compiles of its training
step, compiled as ``remat.jit`` would, in the regime where taped layers live
in a plan (recomputed inside a checkpoint's backward pass):

* the layer alone, checkpointed: temp ``T1`` (its residuals and its working
  set; its input is an argument, so it is not counted);
* the layer twice in a row (own parameters each), checkpointed: temp ``T2``.
  ``T2 - T1`` is what one more taped layer keeps (``kept_bytes``, the
  intermediate activation included); the rest of ``T1`` is the transient
  working set (``transient_bytes``);
* its forward alone: flops and the working set of a forward without tape.

Results are cached by the layer's jaxpr (which includes the shapes), so a
stack of identical blocks costs two compiles, once per shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from remat._src.core import compile as compile_lib
from remat._src.measure import plan_cache
from remat._src.core import policies as policies_lib
from remat._src.measure import profile as profile_lib
from remat._src.core import rng as rng_lib
from remat._src.util import specs
from remat._src.core import transform
from remat._src.util.signature import layer_callers
from remat._src.plans.plan import LayerCost

_CACHE: dict[Any, tuple[int, int, float, float, int]] = {}


def reference_loss(y):
  """Sum of every float leaf of ``y`` (a scalar to differentiate)."""
  leaves = [jnp.sum(a.astype(jnp.float32)) for a in jax.tree_util.tree_leaves(y)
            if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]
  return functools.reduce(jnp.add, leaves, jnp.float32(0))


def reference_step(fn: Callable) -> Callable:
  """The reference training step whose temp memory plans predict and budgets bound.

  ``jax.value_and_grad`` of ``reference_loss(fn(params, x, key))`` with respect to
  ``params`` and ``x``; it returns the loss, the parameter gradients and only
  the *sum* of the input gradient. The input gradient is thus computed but
  lives in temp memory, as for a chain inside a larger model (returned as an
  output, XLA would park other temporaries in its buffer; not computed, the
  step would be cheaper than a chain after an embedding). A step that donates
  parameters and returns updated ones was tried too: XLA then schedules some
  updates late and the temp memory of uniform chains no longer follows the
  schedule.
  """
  def step(params, x, key):
    loss, (gp, gx) = jax.value_and_grad(lambda p, x: reference_loss(fn(p, x, key)), argnums=(0, 1),
                                        allow_int=True)(params, x)
    return loss, gp, reference_loss(gx)
  return step


def measure_costs(layers: Sequence[Callable], params: Sequence[Any], x: Any,
                  key: Any = None, *, policies: bool | Sequence[str] = False) -> tuple[LayerCost, ...]:
  """Measures each layer's :class:`LayerCost` from XLA for these shapes.

  Args:
    layers: the chain, ``layer(p, x)`` or ``layer(p, x, key)`` functions.
    params: one parameter pytree per layer.
    x: the chain input (an array, a tracer or a ``jax.ShapeDtypeStruct``).
    key: an optional PRNG key (or its spec); layer ``i`` is calibrated with it.
    policies: also measure each layer taped under the recomputation policies of
      its menu (``LayerCost.policies``: matmul outputs, subsets of its
      ``checkpoint_name`` tags), keeping those no other option dominates; or
      under exactly these options (``["dots", "save(context)"]``).

  Returns:
    A tuple of :class:`LayerCost`, one per layer.

  Raises:
    ValueError: if ``layers`` and ``params`` differ in length.

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> layer = lambda w, x: jnp.tanh(x @ w)
    >>> w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    >>> x = jax.ShapeDtypeStruct((128, 64), jnp.float32)
    >>> c = remat.segmenters.measure_costs([layer] * 3, [w] * 3, x)
    >>> c[0].input_bytes, c[0].kept_bytes // 1024  # a taped tanh layer keeps its output
    (32768, 32)
  """
  if len(layers) != len(params):
    raise ValueError(
        f"`remat.segmenters.measure_costs` got {len(layers)} layers but {len(params)} parameter "
        "entries; pass one parameter pytree per layer (an empty tuple for parameterless layers).")
  with compile_lib.compiling_with_options():  # measuring traces and compiles are remat's own
    material = None
    if plan_cache.plan_cache_dir() is not None:  # the persistent cache, keyed by the layers' jaxprs
      material = {"chain": chain_key(layers, specs.spec(tuple(params)), specs.spec(x), specs.spec(key)),
                  "policies": policies if isinstance(policies, bool) else list(policies)}
      cached = plan_cache.load("costs", material)
      if cached is not None:
        try:
          return tuple(plan_cache.decode_cost(c) for c in cached)
        except (KeyError, TypeError, ValueError) as e:
          plan_cache.warn_unusable("costs", material, f"does not decode ({type(e).__name__}: {e})")
    out = _measure_costs(layer_callers(layers), params, x, key, policies)
    if material is not None:
      plan_cache.store("costs", material, [plan_cache.encode_cost(c) for c in out])
    return out


def _measure_costs(callers, params, x, key, policies) -> tuple[LayerCost, ...]:
  x_spec, key_spec = specs.spec(x), specs.spec(key)
  out = []
  for f, p in zip(callers, params, strict=True):
    p_spec = specs.spec(p)
    y_spec = _output_spec(f, p_spec, x_spec, key_spec)
    kept, transient, flops, step_flops, fwd_temp = _layer_costs(f, p_spec, x_spec, key_spec, y_spec)
    io = dict(input_bytes=specs.device_bytes(x_spec), output_bytes=specs.device_bytes(y_spec))
    cost = LayerCost(**io, kept_bytes=kept, transient_bytes=transient, flops=flops,
                     step_flops=step_flops, forward_transient_bytes=fwd_temp)
    if policies:
      wanted = None if policies is True else tuple(policies)
      cost = dataclasses.replace(cost, policies=_policy_costs(f, p_spec, x_spec, key_spec, y_spec, cost,
                                                              wanted))
    out.append(cost)
    x_spec = y_spec
  return tuple(out)


def _policy_costs(f, p_spec, x_spec, key_spec, y_spec, tape: LayerCost, wanted=None):
  """``(option, LayerCost)`` for the options of the layer's menu that nothing else dominates
  (or for the ``wanted`` options, all of them)."""
  ck = ("menu", layer_cache_key(f, p_spec, x_spec, key_spec), wanted)
  if ck in _CACHE:
    return _CACHE[ck]

  def under(option):
    return lambda p, x, k: transform.checkpoint(f, policy=policies_lib.policy_of(option))(p, x, k)

  @functools.lru_cache(maxsize=None)
  def lowered_flops(option):  # cheap: the lowered program, no XLA compile
    lowered = jax.jit(reference_step(under(option))).lower(p_spec, x_spec, key_spec)
    return float((lowered.cost_analysis() or {}).get("flops", 0.0))

  found = [(None, tape)]
  ratio = policies_lib.device_ratio(x_spec)
  options = wanted if wanted is not None else policies_lib.menu(f, p_spec, x_spec, key_spec,
                                                                 step_flops=lowered_flops)
  # What each policy keeps: the layer's input and the residuals jax saves under it (named tensors
  # or matmul outputs: exact at the jaxpr level).
  kept_of = {}
  for option in options:
    ck_fn = jax.checkpoint(f, policy=policies_lib.policy_of(option))
    res = profile_lib.saved_residuals(lambda p, x, k, g=ck_fn: reference_loss(g(p, x, k)), p_spec, x_spec,
                                      key_spec)
    kept_of[option] = tape.input_bytes + int(ratio * sum(r.bytes for r in res if "argument" not in r.source))
  if wanted is None:  # compile only the options that no other keeps less than at fewer flops
    options = [o for o in options if not any(
        kept_of[q] <= kept_of[o] and lowered_flops(q) <= lowered_flops(o)
        and (kept_of[q], lowered_flops(q)) != (kept_of[o], lowered_flops(o)) for q in options)]
  # The working set and flops of each from one compile of the layer taped under the policy.
  todo = [o for o in options if ("policy", ck[1], o) not in _CACHE]
  for option in todo:
    _CACHE[("policy", ck[1], option)] = profile_lib.measure(reference_step(under(option)), p_spec, x_spec,
                                                            key_spec)
  for option in options:
    one = _CACHE[("policy", ck[1], option)]
    # (When the layer's forward pass peaks higher than its backward, this over-states the
    # backward's working set: predictions of such options run 10-20% high; verification holds.)
    kept = kept_of[option]
    found.append((option, dataclasses.replace(
        tape, kept_bytes=kept, transient_bytes=max(one.temp_bytes - kept, 0), step_flops=one.flops)))
  kept_options = []
  for j, (option, c) in enumerate(found[1:], start=1):
    dominated = any(  # another way to tape this layer keeps no more, peaks no higher, costs no more
        i != j and d.kept_bytes <= c.kept_bytes and d.step_flops <= c.step_flops
        and d.kept_bytes + d.transient_bytes <= c.kept_bytes + c.transient_bytes and (d != c or i < j)
        for i, (_, d) in enumerate(found))
    if not dominated or wanted is not None:
      kept_options.append((option, c))
  _CACHE[ck] = tuple(kept_options)
  return _CACHE[ck]


def chain_key(layers, p_spec, x_spec, key_spec) -> tuple[str, ...]:
  """Identifies a chain at these shapes and shardings: the jaxpr text of each layer."""
  ids = []
  for f, p in zip(layer_callers(layers), p_spec, strict=True):
    ids.append(layer_cache_key(f, p, x_spec, key_spec))
    x_spec = _output_spec(f, p, x_spec, key_spec)
  return tuple(ids)


def _output_spec(f, p_spec, x_spec, key_spec):
  """The layer's output spec; a same-shaped output keeps the input's sharding (as XLA's propagation does)."""
  return specs.with_sharding_of(jax.eval_shape(f, p_spec, x_spec, key_spec), x_spec)


def _same_structure(a, b) -> bool:
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(la, lb, strict=True))


def layer_cache_key(f, p_spec, x_spec, key_spec):
  """A key that identifies a layer's computation at these shapes and shardings: its jaxpr text."""
  return str(jax.make_jaxpr(f)(p_spec, x_spec, key_spec)) + specs.describe((p_spec, x_spec, key_spec))


def _layer_costs(f, p_spec, x_spec, key_spec, y_spec, *, cache_suffix: str = "",
                 forward: LayerCost | None = None):
  ck = (layer_cache_key(f, p_spec, x_spec, key_spec), cache_suffix)
  if ck in _CACHE:
    return _CACHE[ck]
  # Calibrate in the regime where taped layers live in a plan: recomputed
  # inside a checkpoint's backward pass.
  # Each copy draws its own key, as layers of a chain do (one key for both
  # would let XLA share their random bits and under-count what a layer keeps).
  jobs = [(reference_step(transform.checkpoint(lambda p, x, k: f(p, x, rng_lib.layer_key(k, 0)))),
           (p_spec, x_spec, key_spec))]
  if forward is None:
    jobs.append((lambda p, x, k: f(p, x, k), (p_spec, x_spec, key_spec)))
  if _same_structure(x_spec, y_spec):
    # Two layers with their own parameters: each keeps its own gradient buffer.
    twice = transform.checkpoint(
        lambda ps, x, k: f(ps[1], f(ps[0], x, rng_lib.layer_key(k, 0)), rng_lib.layer_key(k, 1)))
    jobs.append((reference_step(twice), ((p_spec, p_spec), x_spec, key_spec)))
  measured = [profile_lib.measure(fn, *a) for fn, a in jobs]
  one = measured[0]
  if forward is None:
    fwd = measured[1]
    fwd_flops, fwd_temp = fwd.flops, fwd.temp_bytes
  else:  # the same layer under a policy: its forward pass is the same
    fwd_flops, fwd_temp = forward.flops, forward.forward_transient_bytes
  if _same_structure(x_spec, y_spec):
    kept = max(measured[-1].temp_bytes - one.temp_bytes, 0)
  else:
    # A layer that changes the activation's shape cannot be repeated: estimate
    # what it keeps as its output plus the non-argument residuals jax lists.
    res = profile_lib.saved_residuals(lambda p, x: reference_loss(f(p, x, key_spec)), p_spec, x_spec)
    kept = specs.device_bytes(y_spec) + sum(r.bytes for r in res if "argument" not in r.source)
    kept = min(kept, one.temp_bytes)
  transient = max(one.temp_bytes - kept, 0)
  flops = fwd_flops if fwd_flops == fwd_flops else 0.0
  # ``one`` ran the layer's forward twice (checkpointed): a taped step is the rest.
  step_flops = one.flops - flops if one.flops == one.flops else 3.0 * flops
  _CACHE[ck] = (int(kept), int(transient), float(flops), float(step_flops), int(fwd_temp))
  return _CACHE[ck]
