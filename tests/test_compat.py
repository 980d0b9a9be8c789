"""remat/_src/util/compat.py: every private jax/flax name, and what happens without it.

Each hidden-name test runs in a fresh interpreter: it imports jax and flax, hides
the name (the module made unimportable with ``sys.modules[name] = None``, or
the attribute deleted), then imports remat, which must still import, compute
the same gradients, and warn once where it degrades.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import pytest

import remat
from remat._src.util import compat

# -- On the versions we test, every name is found (no silent fallback) --------


def test_every_private_name_is_found_on_the_installed_versions():
  found = {
      "reset_name_stack": compat._reset_name_stack,
      "saved_residuals": compat._saved_residuals,
      "resolve_kwargs": compat.resolve_kwargs is not compat._resolve_kwargs_copy or None,
      "update_context": compat.nnx_update_context,
      "split_inputs": compat.nnx_split_inputs,
      "merge_inputs": compat.nnx_merge_inputs,
      "pack": compat.lift_pack,
      "lift_transform": compat.lift_transform,
      "decorator_lift_transform": compat.decorator_lift_transform,
      "register_exclusion": compat._traceback_register_exclusion,
      "api_boundary": compat._traceback_api_boundary,
      "trace_context": compat._trace_context,
      "trace_state_clean": compat._trace_state_clean,
      "SimpleRematFn": compat.nnx_simple_remat_fn,
      "lift.scan": compat.lift_scan,
      "tree_map_rngs": compat.lift_tree_map_rngs,
      "Scope": compat.core_scope,
  }
  missing = [name for name, v in found.items() if v is None]
  assert not missing, f"not found with {compat.versions()}: {missing}"
  assert compat.HAS_NNX_SPLIT_MERGE and compat.HAS_LINEN_LIFT and compat.HAS_NNX_TREE_MODE
  assert compat.HAS_LINEN_SCAN


def test_versions_names_jax_and_flax():
  v = compat.versions()
  assert f"jax {jax.__version__}" in v and "flax " in v


# -- Public replacements agree with the private originals ---------------------


def _residual_view(found):
  return sorted((tuple(a.shape), str(a.dtype), "host" in str(getattr(a, "memory_space", "")).lower(),
                 "argument" in src) for a, src in found)


@pytest.mark.parametrize("case", ["plain", "checkpoint", "policy", "offload"])
def test_saved_residuals_from_vjp_matches_jax(case):
  w, x = jnp.ones((8, 8)) * 0.1, jnp.ones((4, 8))

  def layer(w, x):
    return jnp.tanh(jnp.sin(x @ w) @ w)

  fn = {"plain": layer,
        "checkpoint": remat.checkpoint(layer),
        "policy": remat.checkpoint(layer, policy=jax.checkpoint_policies.dots_saveable),
        "offload": remat.checkpoint(layer, offload=remat.offload.host(argnums=1, min_bytes=0))}[case]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    want = compat._saved_residuals(fn, w, x)
    got = compat._saved_residuals_from_vjp(fn, w, x)
  assert _residual_view(got) == _residual_view(want)
  if case == "offload":  # the block input is listed on host, as tests/test_offload.py expects
    assert any(v[2] for v in _residual_view(got))


def test_saved_residuals_from_vjp_names_what_jax_names():
  from jax.ad_checkpoint import checkpoint_name

  inner = jax.checkpoint(lambda x: jnp.sin(checkpoint_name(jnp.cos(x), "c")),
                         policy=jax.checkpoint_policies.save_only_these_names("c"))
  for f in (lambda x: jnp.sum(inner(x)), lambda x: jnp.sum(jnp.sin(jnp.cos(x)))):
    got = sorted(s for _, s in compat._saved_residuals_from_vjp(f, jnp.ones(3)))
    want = sorted(s for _, s in compat._saved_residuals(f, jnp.ones(3)))
    assert len(got) == len(want)
    # jax adds "from <file:line>" and argument names; the kind of source must agree.
    for g, w in zip(got, want, strict=True):
      assert g.split(" ")[:2] == w.split(" ")[:2], (got, want)


def test_resolve_kwargs_copy_matches_flax():
  def f(a, b, c=3):
    return a, b, c

  assert compat._resolve_kwargs_copy(f, (1,), {"b": 2}) == compat.resolve_kwargs(f, (1,), {"b": 2})
  assert compat._resolve_kwargs_copy(f, (1,), {"b": 2}) == (1, 2, 3)
  with pytest.raises(TypeError, match="could not be resolved"):
    compat._resolve_kwargs_copy(lambda a, *, k: a, (1,), {"k": 2})


def test_lowered_helpers_fall_back_on_unknown_objects():
  assert compat.lowered_compiler_options(object()) is None
  assert compat.lowered_platform(object()) == jax.default_backend()
  lowered = remat.jit(jnp.sin, compiler_options={"xla_disable_hlo_passes": "foo"}).lower(jnp.ones(3))
  opts = compat.lowered_compiler_options(lowered)
  assert opts is not None and "foo" in opts["xla_disable_hlo_passes"]
  assert compat.lowered_platform(lowered) == jax.default_backend()
  cuda = jax.jit(jnp.sin).trace(jnp.ones(3)).lower(lowering_platforms=("cuda",))
  assert compat.lowered_platform(cuda) == "gpu"


def test_jax_internals_fall_back_to_public_behaviour(monkeypatch):
  assert compat.outside_traces()
  assert jax.jit(lambda x: jnp.asarray(compat.outside_traces()))(1.0).item() is False
  monkeypatch.setattr(compat, "_trace_state_clean", None)  # then traced arguments decide
  assert compat.outside_traces((1.0, jnp.ones(2)))
  assert jax.jit(lambda x: jnp.asarray(compat.outside_traces(x)))(1.0).item() is False
  monkeypatch.setattr(compat, "_trace_context", None)
  assert compat.trace_context() == (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                                    jax.config.jax_numpy_rank_promotion)
  monkeypatch.setattr(compat, "_traceback_api_boundary", None)
  monkeypatch.setattr(compat, "_traceback_register_exclusion", None)
  f = lambda x: x
  assert compat.api_boundary(f) is f
  compat.register_traceback_exclusion("/nowhere")  # a no-op, no error


def test_without_flax_tree_mode_graph_false_says_what_to_do(monkeypatch):
  from flax import nnx

  monkeypatch.setattr(compat, "HAS_NNX_TREE_MODE", False)
  lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match=r"graph=False.*SimpleRematFn.*flax"):
    remat.nnx.checkpoint(lambda m, x: m(x), graph=False)(lin, jnp.ones((1, 2)))


def test_profile_keeps_the_users_compiler_options():
  """remat.profile merges the jit's own options with ours (read through compat)."""
  f = remat.jit(lambda x: jnp.sin(x) * 2, compiler_options={"xla_disable_hlo_passes": "foo"})
  p = remat.profile(f, jnp.ones(3))
  assert p.backend == jax.default_backend()


# -- Each name hidden, in a fresh interpreter ---------------------------------

_PRELUDE = """
import json, sys, warnings
import jax, jax.numpy as jnp, numpy as np
import flax, flax.linen as nn
from flax import nnx
{hide}
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
  import remat
  from remat._src.util import compat
  out = {{}}
{body}
out["warnings"] = [str(w.message) for w in caught if w.category.__name__ == "CompatibilityWarning"]
print("RESULT " + json.dumps(out))
"""


def _run_hidden(hide: str, body: str) -> dict:
  code = _PRELUDE.format(hide=textwrap.dedent(hide), body=textwrap.indent(textwrap.dedent(body), "  "))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
  return json.loads(lines[-1][len("RESULT "):])


def _hide_modules(*names):
  return "\n".join(f"sys.modules[{n!r}] = None" for n in names)


_NESTED = """
def layer(w, x):
  return jnp.tanh(x @ w)

def nested(ws, x, depth):
  if depth == 0:
    return layer(ws[0], x)
  return remat.checkpoint(lambda ws, x: nested(ws[1:], layer(ws[0], x), depth - 1))(ws, x)

ws = [jnp.eye(4) * 0.5 + 0.01 * i for i in range(9)]
x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
loss = lambda f: (lambda ws, x: jnp.sum(f(ws, x) ** 2))
plain = lambda ws, x: [x := layer(w, x) for w in ws][-1]
got = jax.grad(loss(lambda ws, x: nested(ws, x, 8)), argnums=(0, 1))(ws, x)
want = jax.grad(loss(plain), argnums=(0, 1))(ws, x)
out["grads_equal"] = bool(all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
                              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))))
text = jax.jit(jax.grad(loss(lambda ws, x: nested(ws, x, 8)))).lower(ws, x).as_text(debug_info=True)
import re
out["longest_name"] = max(len(s) for s in re.findall(r'loc\\("([^"]*)"', text))
"""


def test_without_the_name_stack_reset_nested_checkpoints_work_and_warn():
  hidden = _run_hidden(_hide_modules("jax.extend.source_info_util", "jax._src.source_info_util"), _NESTED)
  normal = _run_hidden("", _NESTED)
  assert hidden["grads_equal"] and normal["grads_equal"]
  assert normal["warnings"] == []
  assert len(hidden["warnings"]) == 1, hidden["warnings"]  # once, not once per checkpoint
  msg = hidden["warnings"][0]
  assert "reset_name_stack" in msg and f"jax {jax.__version__}" in msg and "fact 10" in msg
  # What the reset prevents: name stacks that grow with every nesting level.
  assert hidden["longest_name"] > 4 * normal["longest_name"], (hidden, normal)


def test_without_jax_traceback_config_checkpoints_still_work():
  names = "compat._trace_context, compat._traceback_api_boundary"
  hidden = _run_hidden(_hide_modules("jax._src.traceback_util", "jax._src.config"),
                       _NESTED + f"\nout['fallbacks'] = [{names}] == [None] * 2\n")
  assert hidden["fallbacks"] and hidden["grads_equal"] and hidden["warnings"] == []


def test_without_jax_saved_residuals_the_listing_is_the_same():
  body = """
  from remat._src.measure import profile as profile_lib
  w, x = jnp.ones((8, 8)), jnp.ones((4, 8))
  f = remat.checkpoint(lambda w, x: jnp.tanh(jnp.sin(x @ w) @ w),
                       policy=jax.checkpoint_policies.dots_saveable)
  out["listing"] = sorted([list(r.shape), r.memory_kind, "argument" in r.source]
                          for r in remat.saved_residuals(f, w, x))
  out["uses_fallback"] = compat._saved_residuals is None
  """
  hidden = _run_hidden("import jax._src.ad_checkpoint as m\ndel m.saved_residuals", body)
  normal = _run_hidden("", body)
  assert hidden["uses_fallback"] and not normal["uses_fallback"]
  assert hidden["listing"] == normal["listing"]
  assert hidden["warnings"] == []  # a full replacement: nothing to warn about


_NNX = """
class Block(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x, train=True):
    return self.drop(jnp.tanh(self.dense(x)), deterministic=not train)

x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
grads = {}
for name, wrap in [("plain", lambda f: f), ("ours", remat.nnx.checkpoint)]:
  block = Block(nnx.Rngs(0, dropout=1))
  f = wrap(lambda m, x: m(x, train=True).sum())
  grads[name] = nnx.grad(f)(block, x)
out["grads_equal"] = bool(all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(
    jax.tree.leaves(grads["plain"]), jax.tree.leaves(grads["ours"]))))
try:
  remat.nnx.checkpoint(lambda m, x: m(x).sum(), offload=remat.offload.host())(Block(nnx.Rngs(0)), x)
  out["offload"] = "ran"
except NotImplementedError as e:
  out["offload"] = str(e)
"""


def test_without_nnx_split_merge_nnx_checkpoint_falls_back_to_nnx_remat():
  hidden = _run_hidden(_hide_modules("flax.nnx.transforms.general", "flax.nnx.transforms.transforms"),
                       _NNX)
  assert hidden["grads_equal"]
  assert len(hidden["warnings"]) == 1 and "flax.nnx.remat" in hidden["warnings"][0]
  assert "flax " in hidden["warnings"][0]
  assert "`remat.nnx.checkpoint(offload=...)`" in hidden["offload"] and "flax" in hidden["offload"]


def test_nnx_fallback_is_not_used_normally():
  normal = _run_hidden("", _NNX)
  assert normal["grads_equal"] and normal["warnings"] == [] and normal["offload"] == "ran"


_LINEN = """
class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    return nn.Dropout(0.5, deterministic=not train)(jnp.tanh(nn.Dense(4)(x)))

x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
v = Block().init(jax.random.key(0), x, False)
rngs = {"dropout": jax.random.key(1)}
grad = lambda cls: jax.grad(lambda v: cls().apply(v, x, True, rngs=rngs).sum())(v)
ours = remat.linen.checkpoint(Block, static_argnums=(2,))
out["grads_equal"] = bool(all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(
    jax.tree.leaves(grad(Block)), jax.tree.leaves(grad(ours)))))
out["same_tree"] = jax.tree.structure(ours().init(jax.random.key(0), x, False)) == jax.tree.structure(v)
try:
  remat.linen.checkpoint(Block, static_argnums=(2,), offload=remat.offload.host(argnums=1))
  out["offload"] = "built"
except NotImplementedError as e:
  out["offload"] = str(e)
"""


def test_without_flax_lift_linen_checkpoint_falls_back_to_nn_remat():
  # (flax.linen.transforms cannot be hidden: flax builds module classes in it at run time.)
  hidden = _run_hidden(_hide_modules("flax.core.lift"), _LINEN)
  assert hidden["grads_equal"] and hidden["same_tree"]
  assert len(hidden["warnings"]) == 1 and "flax.linen.remat" in hidden["warnings"][0]
  assert "`remat.linen.checkpoint(offload=...)`" in hidden["offload"]


def test_linen_fallback_is_not_used_normally():
  normal = _run_hidden("", _LINEN)
  assert normal["grads_equal"] and normal["same_tree"]
  assert normal["warnings"] == [] and normal["offload"] == "built"


_LINEN_SCAN = """
class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(4)(x))

x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
try:
  Stack = remat.linen.scan(Block, length=4, segmenter=remat.segmenters.sqrt())
  v = Stack().init(jax.random.key(0), x)
  out["scan"] = "built" if v["params"]["Dense_0"]["kernel"].shape == (4, 4, 4) else "wrong shape"
except NotImplementedError as e:
  out["scan"] = str(e)
"""


def test_without_flax_lift_linen_scan_says_what_to_do():
  hidden = _run_hidden(_hide_modules("flax.core.lift"), _LINEN_SCAN)
  assert "remat.linen.scan" in hidden["scan"] and "flax.linen.scan(remat.linen.checkpoint(Block)" \
      in hidden["scan"] and "flax " in hidden["scan"]
  assert _run_hidden("", _LINEN_SCAN)["scan"] == "built"


def test_fallback_warning_is_a_user_warning():
  assert issubclass(compat.CompatibilityWarning, UserWarning)
