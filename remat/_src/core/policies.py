"""Per-block recomputation policies the planner may choose: which tensors a taped block keeps.

Practitioners pick these by hand (MaxText's ``remat_policy``: ``minimal``,
``save_qkv_proj``, ...): a block is run under ``jax.checkpoint`` with a policy
that saves some intermediates (named with ``jax.ad_checkpoint.checkpoint_name``,
or every matmul) and recomputes the rest in the backward pass. Here they are
options of a *taped* layer in a :class:`Plan`, named by strings so that plans
stay plain data:

* ``"dots"``: ``jax.checkpoint_policies.dots_saveable`` (keep matmul outputs);
* ``"dots_no_batch"``: ``dots_with_no_batch_dims_saveable`` (projections, not attention);
* ``"save(a,b)"``: ``save_only_these_names("a", "b")``; ``"save()"`` keeps nothing
  but the layer's input.

:func:`menu` finds the names a layer carries and proposes a short list of
name subsets: starting from every name saved, it drops, one at a time, the
name that frees the most bytes per recomputed flop (flops read from the
lowered program, which is cheap: no XLA compile), until none is saved; and every
name but one. The planner measures each
option with XLA like any layer and keeps the options that no other dominates.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import numpy as np

from remat._src.util import specs

DOTS = "dots"
DOTS_NO_BATCH = "dots_no_batch"


@functools.lru_cache(maxsize=None)
def policy_of(option: str) -> Callable[..., bool]:
  """The jax checkpoint policy an option string names.

  Example:

    >>> from remat._src.core.policies import policy_of
    >>> p = policy_of("save(key_proj,query_proj)")  # save_only_these_names("key_proj", "query_proj")
    >>> p is policy_of("save(key_proj,query_proj)")  # one object per option (jax 0.12's compare by id)
    True
  """
  cp = jax.checkpoint_policies
  if option == DOTS:
    return cp.dots_saveable
  if option == DOTS_NO_BATCH:
    return cp.dots_with_no_batch_dims_saveable
  if option.startswith("save(") and option.endswith(")"):
    names = [n for n in option[5:-1].split(",") if n]
    return cp.save_only_these_names(*names) if names else cp.nothing_saveable
  raise ValueError(f"unknown remat policy option {option!r}; expected 'dots', 'dots_no_batch' or "
                   "'save(name,...)'.")


def save(names) -> str:
  """The option that saves exactly ``names`` (sorted, so equal sets give equal options)."""
  return "save(" + ",".join(sorted(names)) + ")"


def describe(option: str | None) -> str:
  if option is None:
    return "tape"
  if option.startswith("save("):
    inner = option[5:-1]
    return f"save {inner.replace(',', ', ')}" if inner else "save nothing but the input"
  return {DOTS: "save matmul outputs", DOTS_NO_BATCH: "save matmul outputs without batch dims"}[option]


def checkpoint_names(fn: Callable, *args) -> dict[str, int]:
  """The ``checkpoint_name`` tags in ``fn(*args)`` and the bytes of the tensors they name
  (per device where the arguments' shardings are known; summed over repeated names)."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  ratio = device_ratio(args[1] if len(args) > 1 else args)  # activations shard like the input
  out: dict[str, int] = {}
  inputs = set(jaxpr.jaxpr.invars)
  for eqn in _walk(jaxpr.jaxpr):
    if eqn.primitive.name == "name" and eqn.invars[0] in inputs:
      continue  # a name on the layer's own input: kept anyway, nothing to choose
    if eqn.primitive.name == "name":
      aval = eqn.outvars[0].aval
      nbytes = math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
      out[eqn.params["name"]] = out.get(eqn.params["name"], 0) + int(nbytes * ratio)
  return out


def has_dots(fn: Callable, *args) -> bool:
  return any(e.primitive.name == "dot_general" for e in _walk(jax.make_jaxpr(fn)(*args).jaxpr))


def menu(fn: Callable, p_spec: Any, x_spec: Any, key_spec: Any, *, step_flops: Callable[[str | None], float],
         max_names: int = 12) -> list[str]:
  """Candidate options for layer ``fn(p, x, key)`` (tape excluded).

  ``step_flops(option)`` returns the flops of the layer's training step under
  an option (the caller lowers it); the greedy order uses it.
  """
  options: list[str] = []
  if has_dots(fn, p_spec, x_spec, key_spec):
    options += [DOTS, DOTS_NO_BATCH]
  names = checkpoint_names(fn, p_spec, x_spec, key_spec)
  if not names:
    return options
  kept = sorted(names)[:max_names]
  base = step_flops(save(kept))
  # What recomputing each name alone costs; drop first the names that free the most bytes per flop.
  extra = {n: max(step_flops(save([m for m in kept if m != n])) - base, 0.0) for n in kept}
  order = sorted(kept, key=lambda n: -names[n] / (extra[n] + 1.0))
  chain = [save(order[i:]) for i in range(len(order) + 1)]
  # Every name but one: what a hand-picked policy often is (all projections, not the context).
  but_one = [save([m for m in kept if m != n]) for n in kept]
  return options + list(dict.fromkeys(chain + but_one))


def _walk(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _walk(inner)


def device_ratio(args) -> float:
  """Per-device bytes over global bytes of ``args`` (keys left out): 1 without known shardings."""
  total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(args)
              if hasattr(x, "shape") and hasattr(x, "dtype") and not specs.is_key(x))
  per = specs.device_bytes([x for x in jax.tree_util.tree_leaves(args) if not specs.is_key(x)])
  return per / total if total else 1.0
