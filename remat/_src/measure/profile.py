"""What the compiler actually did: compiled memory, flops, residuals, op counts."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from remat._src.util import compat
from remat._src.core import compile as compile_lib

_DOT_RE = re.compile(
    r"=\s*\S+\s+dot\((?P<args>[^)]*)\)(?P<attrs>[^\n]*)")


@dataclasses.dataclass(frozen=True)
class Profile:
  """Compiled statistics of one program (from ``memory_analysis`` / ``cost_analysis``).

  Attributes:
    temp_bytes: device scratch memory of the program: what activations,
      residuals and working buffers need beyond arguments and outputs.
    argument_bytes: bytes of the (device) arguments.
    output_bytes: bytes of the (device) outputs.
    alias_bytes: bytes of outputs that reuse donated argument buffers.
    host_temp_bytes: scratch memory placed in host memory (offloaded residuals).
    generated_code_bytes: size of the generated code.
    flops: XLA's flop estimate for the program (``nan`` if unavailable).
    backend: the platform it was compiled for (``"cpu"``, ``"gpu"``, ``"tpu"``).
    hlo: the optimized HLO text (excluded from ``repr`` and comparisons).
  """

  temp_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  host_temp_bytes: int
  generated_code_bytes: int
  flops: float
  backend: str
  hlo: str = dataclasses.field(repr=False, compare=False, default="")

  @classmethod
  def from_compiled(cls, compiled, backend: str | None = None) -> Profile:
    """The profile of an already compiled program (``jax.stages.Compiled``).

    Example:

      >>> import jax.numpy as jnp, remat
      >>> compiled = remat.jit(lambda x: jnp.tanh(x @ x)).lower(jnp.ones((8, 8))).compile()
      >>> remat.Profile.from_compiled(compiled).flops > 0
      True
    """
    return profile_compiled(compiled, backend or jax.default_backend())

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries, less aliased (donated) outputs."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  def count_dots(self, *, lhs_contracting: tuple[int, ...] | None = None,
                 rhs_contracting: tuple[int, ...] | None = None) -> int:
    """Number of ``dot`` instructions in the optimized HLO (fusions included).

    With ``lhs_contracting``/``rhs_contracting`` only dots with these
    contracting dimensions count: for ``x @ w`` layers the forward matmul is
    ``(1,)``/``(0,)`` while the two backward ones are ``(1,)``/``(1,)`` and
    ``(0,)``/``(0,)``, so this counts forward layer evaluations.
    """
    n = 0
    for m in _DOT_RE.finditer(self.hlo):
      attrs = m.group("attrs")
      if lhs_contracting is not None and f"lhs_contracting_dims={_dims(lhs_contracting)}" not in attrs:
        continue
      if rhs_contracting is not None and f"rhs_contracting_dims={_dims(rhs_contracting)}" not in attrs:
        continue
      n += 1
    return n

  def forward_dots(self) -> int:
    """Forward matmuls of ``x @ w`` layers (``nn.Dense`` too) in the optimized HLO.

    A forward ``x @ w`` contracts the input's last axis with the weight's
    first (``lhs_contracting_dims={1}`` or ``{2}``, ``rhs_contracting_dims={0}``);
    its two backward matmuls contract other axes. Divided by the dots of one
    layer, this counts layer forward evaluations, recomputations included.
    """
    return (self.count_dots(lhs_contracting=(1,), rhs_contracting=(0,))
            + self.count_dots(lhs_contracting=(2,), rhs_contracting=(0,)))

  def count_ops(self, opcode: str) -> int:
    """Number of HLO instructions with this opcode (e.g. ``"tanh"``, ``"copy-start"``)."""
    return len(re.findall(rf"=\s*\S+\s+{re.escape(opcode)}\(", self.hlo))

  def __str__(self) -> str:
    mib = lambda b: f"{b / 2**20:,.2f} MiB"
    return (f"Profile[{self.backend}]: peak {mib(self.peak_bytes)} "
            f"(temp {mib(self.temp_bytes)}, args {mib(self.argument_bytes)}, "
            f"out {mib(self.output_bytes)}, aliased {mib(self.alias_bytes)}), "
            f"host temp {mib(self.host_temp_bytes)}, {self.flops / 1e9:,.3f} GFLOP")


def _dims(t) -> str:
  return "{" + ",".join(str(int(i)) for i in t) + "}"


def compile_fn(fn: Callable, *args, **kwargs):
  """Lower and compile ``fn`` (jitted or not) with ``remat.compiler_options()``."""
  return _compile(fn, args, kwargs, analysis=False)


def measure(fn: Callable, *args) -> Profile:
  """``profile`` of a program compiled only to be measured, never run: where XLA's code generator
  does not change the numbers (``compile.analysis_options``), it skips its optimisations."""
  return profile_compiled(*_compile(fn, args, {}, analysis=True))


def _compile(fn: Callable, args, kwargs, *, analysis: bool):
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  with compile_lib.compiling_with_options():  # checkpoints traced here get the options: no warning
    lowered = jitted.lower(*args, **kwargs)
  backend = compat.lowered_platform(lowered)
  # Options given to ``lowered.compile`` replace the ones from jax.jit; a
  # function from ``remat.jit`` already carries them, merging is idempotent.
  opts = compile_lib.merge_compiler_options(compat.lowered_compiler_options(lowered), backend)
  if analysis:
    opts = {**compile_lib.analysis_options(backend), **opts}
  return lowered.compile(opts), backend


def profile(fn: Callable, *args, **kwargs) -> Profile:
  """Compiles ``fn(*args, **kwargs)`` as ``remat.jit`` would and reports its costs.

  Measure a whole training step (loss, gradients, update) to see what
  checkpointing saves: ``temp_bytes`` is where activations live.

  Args:
    fn: a function or a ``jax.jit``/``remat.jit`` function (its shardings and
      donations are kept).
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: example keyword arguments.

  Returns:
    A :class:`Profile`.

  Raises:
    TypeError: if ``fn`` is not callable.

  Example:

    >>> import jax, jax.numpy as jnp, remat
    >>> p = remat.profile(lambda x: jnp.tanh(x @ x).sum(), jnp.ones((64, 64)))
    >>> p.flops > 0
    True
  """
  if not callable(fn):
    raise TypeError(f"`remat.profile` expects a callable, but got {fn!r}.")
  return profile_compiled(*compile_fn(fn, *args, **kwargs))


def profile_compiled(compiled, backend: str) -> Profile:
  """The :class:`Profile` of an already compiled program (``jax.stages.Compiled``)."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  get = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0
  return Profile(
      temp_bytes=get("temp_size_in_bytes"),
      argument_bytes=get("argument_size_in_bytes"),
      output_bytes=get("output_size_in_bytes"),
      alias_bytes=get("alias_size_in_bytes"),
      host_temp_bytes=get("host_temp_size_in_bytes"),
      generated_code_bytes=get("generated_code_size_in_bytes"),
      flops=float((cost or {}).get("flops", float("nan"))),
      backend=backend,
      hlo=compiled.as_text() or "",
  )


@dataclasses.dataclass(frozen=True)
class Residual:
  """One value kept from the forward pass for the backward pass."""

  shape: tuple[int, ...]
  dtype: Any
  bytes: int
  memory_kind: str  # "device" or "host"
  source: str

  def __str__(self) -> str:
    dt = getattr(self.dtype, "name", str(self.dtype))
    return f"{dt}{list(self.shape)} {self.bytes:,} B on {self.memory_kind}: {self.source}"


def saved_residuals(fn: Callable, *args, **kwargs) -> list[Residual]:
  """Lists what the backward pass of ``fn`` keeps from its forward pass.

  Read from the jaxpr of ``jax.vjp(fn, ...)``: it shows what JAX hands to the
  backward pass (XLA may fuse some of it away; use ``remat.profile`` for
  compiled numbers).

  Args:
    fn: the function to differentiate.
    *args: example arguments (every float input is differentiated).
    **kwargs: example keyword arguments.

  Returns:
    A list of :class:`Residual`, with shape, dtype, bytes, memory kind
    (``"device"`` or ``"host"``) and where it comes from.

  Example:

    >>> import jax.numpy as jnp, remat
    >>> f = remat.checkpoint(lambda x: jnp.sin(jnp.sin(x)))
    >>> [r.shape for r in remat.saved_residuals(f, jnp.ones(3))]
    [(3,)]
  """
  found = compat.saved_residuals(fn, *args, **kwargs)
  out = []
  for aval, src in found:
    shape = tuple(getattr(aval, "shape", ()))
    dtype = getattr(aval, "dtype", None)
    try:
      nbytes = int(np.prod(shape, dtype=np.int64)) * int(np.dtype(dtype).itemsize)
    except TypeError:  # extended dtypes (keys)
      nbytes = int(np.prod(shape, dtype=np.int64)) * 8
    space = str(getattr(aval, "memory_space", "device")).lower()
    kind = "host" if "host" in space else "device"
    out.append(Residual(shape=shape, dtype=dtype, bytes=nbytes, memory_kind=kind, source=src))
  return out
