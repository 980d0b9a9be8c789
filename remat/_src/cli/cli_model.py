"""The model the command line plans: a built-in reference chain or the user's own factory.

``load_model(text)`` is the one place that reads ``--model`` (``remat plan``;
meant for ``remat fit`` too). It returns a :class:`ChainModel`: layer
functions, one parameter pytree per layer, an example input and a key, the
form ``remat.sequential`` runs.

A user factory is named ``package.module:factory`` or ``path/to/file.py:factory``
and called with no arguments (or with the size flags given on the command
line that it accepts as keywords: ``depth``, ``width``, ``batch``, ``seq_len``,
``heads``). It returns a dict in one of two forms (see :data:`CONTRACT`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

import jax

from remat._src.measure import costs as costs_lib
from remat._src.util import specs
from remat._src.chains import sequential as seq_lib
from remat._src.plans.plan import Plan

BUILTIN = ("mlp", "transformer")
SIZE_FLAGS = ("depth", "width", "batch", "seq_len", "heads")

CONTRACT = """\
Your own model: --model package.module:factory or --model path/to/file.py:factory.
The factory is called with no arguments (size flags such as --batch are passed
as keywords to a factory that accepts them) and returns a dict, either

  {"module": m, "x": batch}                       a Flax chain of blocks, where m is
      nn.Sequential([...]), remat.linen.Sequential, nnx.Sequential(...) or a list
      of modules; optional keys: "variables" (linen; default: initialised as
      shapes with jax.eval_shape, nothing allocated), "args" and "kwargs" (given
      to every block, e.g. "args": (True,) for block(x, train)), "rngs" (linen
      PRNG streams handed to the blocks, default ("dropout",));
  {"layers": [f, ...], "params": [p, ...], "x": batch}   a chain of functions
      f(p, x) or f(p, x, key), as remat.sequential takes; optional "key". One
      function with "params" stacked on a leading axis is a stack of that many.

Arrays may be given as jax.ShapeDtypeStruct (shapes only). See examples/my_model.py."""


class ModelError(ValueError):
  """``--model`` cannot be used; ``flag`` is the command-line flag at fault."""

  def __init__(self, message: str, flag: str = "--model"):
    super().__init__(message)
    self.flag = flag


@dataclasses.dataclass(frozen=True)
class ChainModel:
  """A chain of layers at given shapes: what ``remat plan`` plans for.

  Attributes:
    name: what ``--model`` said (``transformer``, ``examples/my_model.py:model``).
    layers: layer functions ``layer(p, x)`` or ``layer(p, x, key)``.
    params: one parameter pytree per layer (arrays or ``jax.ShapeDtypeStruct``).
    x: the chain's input (an array or a ``jax.ShapeDtypeStruct``).
    key: a PRNG key, a dict of keys (one per stream), or ``None``.
    description: one line describing the model and its sizes.
  """

  name: str
  layers: tuple[Callable, ...]
  params: tuple[Any, ...]
  x: Any
  key: Any = None
  description: str = ""

  @property
  def depth(self) -> int:
    return len(self.layers)

  @property
  def activation_bytes(self) -> int:
    """Bytes of the chain's input: the unit the command line counts activations in."""
    return max(1, specs.device_bytes(specs.spec(self.x)))

  def specs(self) -> tuple[list[Any], Any, Any]:
    """``(params, x, key)`` as ``jax.ShapeDtypeStruct`` s."""
    return specs.spec(list(self.params)), specs.spec(self.x), specs.spec(self.key)

  def run(self, plan_or_segmenter: Any = None) -> Callable:
    """``run(params, x, key)``: the chain under a plan or segmenter (``None``: plain backprop)."""
    if plan_or_segmenter is None:
      plan_or_segmenter = seq_lib.plain_plan(self.depth)
    return seq_lib.sequential(self.layers, plan_or_segmenter)

  def step(self, plan_or_segmenter: Any = None) -> Callable:
    """The chain's reference training step (what a budget bounds): ``step(params, x, key)``."""
    return costs_lib.reference_step(self.run(plan_or_segmenter))

  def plan(self, segmenter: Any) -> Plan:
    """The plan ``segmenter`` makes for these shapes (``budget`` verifies it by compiling)."""
    return seq_lib.chain_plan(self.layers, segmenter, *self.specs())


def load_model(text: str, **sizes: int | None) -> ChainModel:
  """The :class:`ChainModel` that ``--model text`` names.

  Args:
    text: ``mlp``, ``transformer``, ``package.module:factory`` or ``path/to/file.py:factory``.
    **sizes: ``depth``, ``width``, ``batch``, ``seq_len``, ``heads`` given on the command
      line (``None`` where not given).

  Raises:
    ModelError: with a one-line message saying what to change.
  """
  unknown = set(sizes) - set(SIZE_FLAGS)
  if unknown:
    raise TypeError(f"unknown sizes {sorted(unknown)}; the sizes are {', '.join(SIZE_FLAGS)}.")
  if ":" not in text:
    if text in BUILTIN:
      return _builtin(text, **sizes)
    raise ModelError(
        f"unknown model {text!r}: use a built-in reference model ({', '.join(BUILTIN)}) or your own "
        "as package.module:factory or path/to/file.py:factory (see `remat plan --help`).")
  target, _, attr = text.rpartition(":")
  if not target or not attr.isidentifier():
    raise ModelError(f"{text!r} does not name a factory: write package.module:factory or "
                     "path/to/file.py:factory, with a function name after the colon.")
  factory = getattr(_import(target, text), attr, None)
  if factory is None:
    raise ModelError(f"{target!r} has no attribute {attr!r}; name the function that builds your model.")
  if not callable(factory):
    raise ModelError(f"{target}:{attr} is {type(factory).__name__}, not a function; name the "
                     "function that builds your model.")
  kwargs = _factory_sizes(factory, attr, sizes)
  try:
    out = factory(**kwargs)
  except Exception as e:  # noqa: BLE001 - the user's code: report it in one line
    raise ModelError(f"calling `{attr}()` raised {type(e).__name__}: {_first_line(e)}") from None
  model = from_dict(out, name=text)
  _check_runs(model)
  return model


def from_dict(spec: Any, *, name: str = "model") -> ChainModel:
  """The :class:`ChainModel` of a factory's dict (see :data:`CONTRACT`)."""
  if not isinstance(spec, dict):
    raise ModelError(f"the factory returned {type(spec).__name__}; it must return a dict such as "
                     '{"module": nn.Sequential([...]), "x": batch} or {"layers": [...], "params": '
                     '[...], "x": batch} (see `remat plan --help`).')
  if ("module" in spec) == ("layers" in spec):
    raise ModelError(f"the factory's dict must have exactly one of the keys 'module' or 'layers', but "
                     f"has {sorted(spec)}.")
  allowed = ({"module", "x", "variables", "args", "kwargs", "rngs"} if "module" in spec
             else {"layers", "params", "x", "key"})
  extra = sorted(set(spec) - allowed)
  if extra:
    kind = "module" if "module" in spec else "layers"
    raise ModelError(f"the factory's dict has unknown keys {extra}; with {kind!r} the keys are "
                     f"{sorted(allowed)}.")
  if "x" not in spec:
    raise ModelError("the factory's dict needs 'x', an example batch (an array or a jax.ShapeDtypeStruct).")
  if not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in jax.tree_util.tree_leaves(spec["x"])) or \
     not jax.tree_util.tree_leaves(spec["x"]):
    raise ModelError(f"the factory's 'x' must be an array or a jax.ShapeDtypeStruct (or a pytree of "
                     f"them), but got {type(spec['x']).__name__}.")
  return _from_module(spec, name) if "module" in spec else _from_layers(spec, name)


### Implementation


def _builtin(name, *, depth, width, batch, seq_len, heads) -> ChainModel:
  from remat._src.cli.cli_util import bench_module

  chains = bench_module("chains")
  if name == "mlp":
    for flag, v in (("--seq-len", seq_len), ("--heads", heads)):
      if v is not None:
        raise ModelError(f"{flag} applies to the transformer; the mlp chain has no {flag[2:]}: drop "
                         f"{flag}, or use --model transformer.", flag=flag)
  width, heads = width or 256, heads or 4
  if name == "transformer" and width % heads:
    from remat._src.cli.cli_util import nearest_divisor

    divisor = nearest_divisor(width, heads)
    raise ModelError(f"{heads} does not divide --width {width} (each attention head gets width / heads "
                     f"features); use a divisor of {width}, such as --heads {divisor}.", flag="--heads")
  c = chains.Chain(model=name, depth=depth or 12, width=width, batch=batch or (512 if name == "mlp" else 8),
                   seq_len=seq_len or 128, heads=heads)
  params, x, key = c.specs()
  desc = f"{name}: depth {c.depth}, width {c.width}, batch {c.batch}" + (
      f", seq_len {c.seq_len}, heads {c.heads}" if name == "transformer" else "")
  return ChainModel(name=name, layers=tuple(c.layers), params=tuple(params), x=x, key=key,
                    description=desc)


def _import(target: str, text: str):
  """The module of ``path/to/file.py`` or ``package.module``."""
  if target.endswith(".py") or "/" in target or os.sep in target:
    path = os.path.abspath(target)
    if not os.path.isfile(path):
      raise ModelError(f"no file {target!r} (from {text!r}); give the path of the Python file that "
                       "defines your factory, as path/to/file.py:factory.")
    mod_name = "_remat_model_" + "".join(c if c.isalnum() else "_" for c in path)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))  # as when running the file: it may import its neighbours
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code: report it in one line
      raise ModelError(f"running {target!r} raised {type(e).__name__}: {_first_line(e)}") from None
    finally:
      sys.path.remove(os.path.dirname(path))
    return module
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.insert(0, os.getcwd())  # `remat` as a console script: find modules of the current folder
  try:
    return importlib.import_module(target)
  except ModuleNotFoundError as e:
    raise ModelError(f"cannot import {target!r} ({e}); give an importable module (run from the folder "
                     "that holds it) or a file as path/to/file.py:factory.") from None
  except Exception as e:  # noqa: BLE001 - the user's code: report it in one line
    raise ModelError(f"importing {target!r} raised {type(e).__name__}: {_first_line(e)}") from None


def _factory_sizes(factory, attr, sizes) -> dict[str, int]:
  given = {k: v for k, v in sizes.items() if v is not None}
  if not given:
    return {}
  try:
    params = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    params = {}
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  for k in given:
    if k not in params and not takes_any:
      flag = "--" + k.replace("_", "-")
      raise ModelError(f"`{attr}` takes no `{k}` argument, so {flag} cannot be passed to it: drop {flag}, "
                       f"or add a `{k}` parameter to `{attr}`.", flag=flag)
  return given


def _from_layers(spec: dict, name: str) -> ChainModel:
  layers, params, x = spec["layers"], spec.get("params"), spec["x"]
  if callable(layers) and not isinstance(layers, (list, tuple)):  # one layer over stacked parameters
    leaves = jax.tree_util.tree_leaves(params)
    sizes = {int(a.shape[0]) for a in leaves if getattr(a, "ndim", len(getattr(a, "shape", ()))) >= 1}
    if len(sizes) != 1 or len(leaves) == 0:
      raise ModelError("with one function as 'layers', 'params' must be stacked on a leading axis of one "
                       f"size (the depth), but the leading sizes are {sorted(sizes)}.")
    depth = sizes.pop()
    one = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
    layers, params = [layers] * depth, [one] * depth
  if not isinstance(layers, (list, tuple)) or not layers:
    raise ModelError(f"'layers' must be a non-empty list of functions f(p, x) or f(p, x, key), but got "
                     f"{type(layers).__name__}.")
  bad = [i for i, f in enumerate(layers) if not callable(f)]
  if bad:
    raise ModelError(f"'layers' must hold functions f(p, x) or f(p, x, key), but entry {bad[0]} is "
                     f"{type(layers[bad[0]]).__name__}.")
  if params is None:
    params = [()] * len(layers)
  if not isinstance(params, (list, tuple)) or len(params) != len(layers):
    n = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
    raise ModelError(f"'params' must be a list with one parameter pytree per layer ({len(layers)}), but "
                     f"got {n}.")
  return ChainModel(name=name, layers=tuple(layers), params=tuple(params), x=x, key=spec.get("key"),
                    description=f"{name}: {len(layers)} layers, input {_shape(x)}")


def _from_module(spec: dict, name: str) -> ChainModel:
  import flax.linen as nn
  from flax import nnx

  from remat._src.adapters.linen_sequential import Sequential as LinenSequential

  module, x = spec["module"], spec["x"]
  args, kwargs = tuple(spec.get("args", ())), dict(spec.get("kwargs", {}))
  if isinstance(module, (list, tuple)):
    layers = list(module)
  elif isinstance(module, (nn.Sequential, LinenSequential)):
    layers = list(module.layers)
  elif isinstance(module, nnx.Module) and isinstance(getattr(module, "layers", None), (list, nnx.List)):
    layers = list(module.layers)  # nnx.Sequential, remat.nnx.Sequential
  else:
    raise ModelError(
        f"'module' must be a chain of blocks: nn.Sequential([...]), remat.linen.Sequential, "
        f"nnx.Sequential(...) or a list of modules, but got {type(module).__name__}. The planner plans "
        "a chain; build the blocks your model repeats into one of these.")
  if not layers:
    raise ModelError("'module' has no layers.")
  modules = [m for m in layers if isinstance(m, (nn.Module, nnx.Module))]
  if any(isinstance(m, nnx.Module) for m in modules):
    if any(isinstance(m, nn.Module) for m in modules):
      raise ModelError("'module' mixes linen and NNX modules; use one kind.")
    if "variables" in spec or "rngs" in spec:
      raise ModelError("'variables' and 'rngs' are for linen modules; NNX modules carry their own state.")
    return _nnx_chain(layers, x, args, kwargs, name)
  return _linen_chain(layers, spec, x, args, kwargs, name)


def _linen_chain(layers, spec, x, args, kwargs, name) -> ChainModel:
  import flax.linen as nn

  from remat._src.adapters.linen_sequential import Sequential as LinenSequential

  streams = tuple(spec.get("rngs", ("dropout",)))
  variables = spec.get("variables")
  if variables is None:  # shapes only: nothing is allocated
    wrapper = LinenSequential(list(layers))  # nn.Sequential's parameter tree; args reach every layer
    init_keys = lambda: {"params": jax.random.key(0), **{s: jax.random.key(1) for s in streams}}  # noqa: E731
    try:
      variables = jax.eval_shape(lambda x: wrapper.init(init_keys(), x, *args, **kwargs), specs.spec(x))
    except Exception as e:  # noqa: BLE001 - the user's model: report it in one line
      raise ModelError(f"initialising the module on 'x' {_shape(x)} raised {type(e).__name__}: "
                       f"{_first_line(e)}") from None
  fns, per_layer = [], []
  for i, layer in enumerate(layers):
    sub = f"layers_{i}"
    if isinstance(layer, nn.Module):
      unbound = layer.clone(parent=None)
      per_layer.append({c: v[sub] for c, v in variables.items() if isinstance(v, dict) and sub in v})
      # Collections a block updates in training (BatchNorm's `batch_stats`) are mutable while
      # measuring and planning, as in a training step's `apply(..., mutable=[...])`; the updates
      # are computed (and cost what they cost) but not kept.
      mutable = tuple(c for c in per_layer[-1] if c != "params")

      def fn(v, x, key, unbound=unbound, mutable=mutable):
        if mutable:
          return unbound.apply(v, x, *args, rngs=key, mutable=list(mutable), **kwargs)[0]
        return unbound.apply(v, x, *args, rngs=key, **kwargs)
    else:
      per_layer.append(())

      def fn(v, x, key, layer=layer):
        return layer(x, *args, **kwargs)
    fns.append(fn)
  key = {s: jax.random.key(1) for s in streams} or None
  return ChainModel(name=name, layers=tuple(fns), params=tuple(per_layer), x=x, key=key,
                    description=f"{name}: {len(fns)} linen blocks, input {_shape(x)}")


def _nnx_chain(layers, x, args, kwargs, name) -> ChainModel:
  from flax import nnx

  fns, states = [], []
  for layer in layers:
    if isinstance(layer, nnx.Module):
      graphdef, state = nnx.split(layer)
      states.append(state)
      fns.append(lambda s, x, key, gd=graphdef: nnx.merge(gd, s)(x, *args, **kwargs))
    else:
      states.append(())
      fns.append(lambda s, x, key, f=layer: f(x, *args, **kwargs))
  return ChainModel(name=name, layers=tuple(fns), params=tuple(states), x=x, key=None,
                    description=f"{name}: {len(fns)} NNX blocks, input {_shape(x)}")


def _check_runs(model: ChainModel) -> None:
  """Runs the chain on shapes once, so that a mistake in the factory is reported in one line."""
  try:
    jax.eval_shape(model.run(), *model.specs())
  except Exception as e:  # noqa: BLE001 - the user's model: report it in one line
    hint = ""
    if type(e).__name__ == "ModifyScopeVariableError":
      hint = (" A block writes a variable collection that its initialisation did not create (for "
              "example `self.sow` or a collection made only in training): create it in `init` too, "
              "or give the 'variables' key with every collection the blocks update.")
    raise ModelError(f"running the chain on 'x' {_shape(model.x)} raised {type(e).__name__}: "
                     f"{_first_line(e)}{hint}") from None


def _shape(x) -> str:
  leaves = jax.tree_util.tree_leaves(x)
  if len(leaves) == 1:
    a = leaves[0]
    return f"{getattr(a.dtype, 'name', a.dtype)}{list(a.shape)}"
  return f"({len(leaves)} arrays)"


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else ""
