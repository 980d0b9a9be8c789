"""Host offload of checkpoint residuals on XLA memory kinds.

A value placed in ``pinned_host`` inside a jitted program (``jax.device_put(x,
jax.memory.Space.Host)``) is copied to host memory when it is produced and
brought back (``jax.memory.Space.Device``) where the backward pass needs it;
XLA overlaps both copies with compute. ``remat.checkpoint(fn,
offload=remat.offload.host())`` does this for the values the checkpoint keeps:
its activation inputs (``policy=None``) or the intermediates a jax policy saves.

``jax.memory.Space.Host`` keeps the value's sharding, so offloaded residuals of
a sharded model stay sharded (each device offloads its own shard).

XLA:CPU accepts memory-kind placements but executes no move (its lowering drops
them: docs/facts.md, fact 5); :func:`supported` says so and the policy warns once.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from remat._src.core.hostlink import DEFAULT_LATENCY_S, HostLink, platform

_HOST = jax.memory.Space.Host
_DEVICE = jax.memory.Space.Device
_API = "`remat.offload.host`"

# Below this size a move costs more in fixed latency than it frees: at 50 GB/s
# 64 KiB take 1.3 µs, a fraction of the ~10 µs fixed cost of a transfer.
DEFAULT_MIN_BYTES = 1 << 16


class OffloadNotExecutedWarning(UserWarning):
  """The backend accepts host placements but does not move anything (XLA:CPU)."""


_WARNED: set[str] = set()  # platforms already warned about (warn once per process)


### Public API


def supported(device: jax.Device | str | None = None) -> bool:
  """Whether ``device`` (a ``jax.Device``, a platform name, or ``None`` for the first
  device) executes memory-kind moves to ``pinned_host``: GPU and TPU do; XLA:CPU
  accepts the placements and moves nothing (results stay exact).

  Raises:
    TypeError: if ``device`` is neither a device, a string nor ``None``.

  Example:

    >>> import jax, remat
    >>> remat.offload.supported("cpu")
    False
    >>> remat.offload.supported("tpu")
    True
  """
  if isinstance(device, str):
    return platform(device) in ("gpu", "tpu")
  if device is None:
    device = jax.devices()[0]
  if not isinstance(device, jax.Device):
    raise TypeError(
        f"`remat.offload.supported` expects a `jax.Device`, a platform name or None, "
        f"but got {device!r} of type {type(device).__name__}.")
  if platform(device.platform) not in ("gpu", "tpu"):
    return False
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # noqa: BLE001 - runtimes without memories API: no offload
    return False
  return "pinned_host" in kinds


@dataclasses.dataclass(frozen=True)
class HostOffload:
  """Moves checkpoint residuals to ``pinned_host`` memory; build with :func:`host`.

  Attributes:
    argnums: positions (in the call of the checkpointed function) of the
      arguments that hold activations to move, or ``None`` for every dynamic
      argument, keyword arguments included. Closed-over values are never moved.
    exclude_argnums: positions never moved (parameters), applied after
      ``argnums``.
    min_bytes: values smaller than this stay in device memory.
    bandwidth: assumed one-direction host link bandwidth in bytes/s, or
      ``None`` for the backend default (``DEFAULT_BANDWIDTH``).
    latency: assumed fixed cost of one transfer, in seconds.
  """

  argnums: tuple[int, ...] | None = None
  exclude_argnums: tuple[int, ...] = ()
  min_bytes: int = DEFAULT_MIN_BYTES
  bandwidth: float | None = None
  latency: float = DEFAULT_LATENCY_S

  def __post_init__(self):
    if self.argnums is not None:
      object.__setattr__(self, "argnums", _positions(
          self.argnums, "argnums", "the positions of the activation arguments, e.g. "
          "`argnums=(1,)` for `block(params, x)`"))
    object.__setattr__(self, "exclude_argnums", _positions(
        self.exclude_argnums, "exclude_argnums", "the positions of the parameter arguments, "
        "e.g. `exclude_argnums=(0,)` for `block(params, x)`"))
    if not _is_int(self.min_bytes) or self.min_bytes < 0:
      raise TypeError(
          f"the `min_bytes` argument to {_API} must be a non-negative int, but got "
          f"{self.min_bytes!r}. Use 0 to move every residual.")
    object.__setattr__(self, "min_bytes", int(self.min_bytes))
    try:
      link = HostLink(self.bandwidth, self.latency)  # validates both
    except ValueError as e:
      raise ValueError(str(e).replace("`remat.offload.HostLink`", _API)) from None
    object.__setattr__(self, "bandwidth", link.bandwidth)
    object.__setattr__(self, "latency", link.latency)

  @property
  def link(self) -> HostLink:
    """The :class:`HostLink` (bandwidth, latency) a planner assumes for this policy."""
    return HostLink(bandwidth=self.bandwidth, latency=self.latency)

  def worth_moving(self, nbytes: int) -> bool:
    """Whether a value of ``nbytes`` bytes is large enough to move (``>= min_bytes``)."""
    return nbytes > 0 and nbytes >= self.min_bytes

  def moves_input(self, origin: int | str | None) -> bool:
    """Whether an input leaf from ``origin`` (a position, a keyword, or ``None``
    for a closed-over value) is an activation this policy moves."""
    if origin is None:
      return False
    if isinstance(origin, int) and origin in self.exclude_argnums:
      return False
    if self.argnums is None:
      return True
    return isinstance(origin, int) and origin in self.argnums

  def with_leading_arguments(self, n: int) -> HostOffload:
    """The same policy for a wrapper that prepends ``n`` positional arguments that never
    move (the Flax adapters' ``inner(variables, rngs, *user_args)``).

    Example:

      >>> import remat
      >>> remat.offload.host(argnums=1).with_leading_arguments(2).argnums
      (3,)
    """
    if not _is_int(n) or n < 0:
      raise TypeError(
          f"`HostOffload.with_leading_arguments` expects a non-negative int, but got {n!r}.")
    return dataclasses.replace(
        self,
        argnums=None if self.argnums is None else tuple(i + n for i in self.argnums),
        exclude_argnums=tuple(range(n)) + tuple(i + n for i in self.exclude_argnums))

  # -- Hooks called by `remat.checkpoint` ----------------------------------

  def to_host(self, res: Any, *, inputs: Sequence[Any] = (),
              origins: Sequence[int | str | None] | None = None) -> Any:
    """Places the activation leaves of ``res`` in ``pinned_host`` (``remat.checkpoint``'s forward).

    An input leaf moves if :meth:`moves_input` accepts its origin, any other leaf (an
    intermediate a jax policy saved) moves; leaves below ``min_bytes``, keys and values
    already on host stay. Returns what :meth:`to_device` turns back into ``res``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(res)
    by_id: dict[int, int | str | None] = {}
    if origins is not None:
      for x, o in zip(inputs, origins, strict=True):
        by_id.setdefault(id(x), o)
    moved: dict[int, Any] = {}
    out, mask = [], []
    for x in leaves:
      wanted = self.moves_input(by_id[id(x)]) if id(x) in by_id else True
      if wanted and _movable(x) and self.worth_moving(_nbytes(x)):
        if id(x) not in moved:
          moved[id(x)] = jax.device_put(x, _HOST)
        out.append(moved[id(x)])
        mask.append(True)
      else:
        out.append(x)
        mask.append(False)
    if moved:
      _warn_if_not_executed(len(moved), sum(_nbytes(x) for x in moved.values()))
    return _Offloaded(out, treedef, tuple(mask))

  def to_device(self, res: Any) -> Any:
    """Brings back what :meth:`to_host` moved (called in the backward pass)."""
    if not isinstance(res, _Offloaded):
      raise TypeError(
          f"{_API}: the residuals given to `to_device` were not produced by "
          f"`to_host` (got {type(res).__name__}). Call both hooks as "
          "`remat.checkpoint` does.")
    leaves = [jax.device_put(x, _DEVICE) if m else x for x, m in zip(res.leaves, res.mask, strict=True)]
    return jax.tree_util.tree_unflatten(res.treedef, leaves)


def host(*, argnums: int | Sequence[int] | None = None, exclude_argnums: int | Sequence[int] = (),
         min_bytes: int = DEFAULT_MIN_BYTES, bandwidth: float | None = None,
         latency: float = DEFAULT_LATENCY_S) -> HostOffload:
  """An offload policy that keeps checkpoint residuals in host memory (``pinned_host``).

  Pass it as ``remat.checkpoint(fn, offload=remat.offload.host(...))``. In the
  forward pass the values the checkpoint keeps are copied to host memory; in
  the backward pass they are copied back, before the recomputation. With
  ``policy=None`` those values are the function's inputs: the activations
  among them move, parameters do not. Parameters stay resident anyway, so
  moving them would free nothing: pass them by closure (closed-over values
  never move), list them in ``exclude_argnums``, or name the activations in
  ``argnums``. With a jax
  ``policy=``, the intermediates it saves move too.

  On a backend that does not execute memory-kind moves (XLA:CPU, see
  :func:`supported`) the placements are still written into the program, the
  results are exact, nothing moves, and an ``OffloadNotExecutedWarning`` is
  issued once.

  Args:
    argnums: positions of the checkpointed function's arguments that hold
      activations (``argnums=1`` for ``block(params, x)``), or ``None`` to move
      every dynamic argument (keyword arguments included).
    exclude_argnums: positions that never move, e.g. ``exclude_argnums=0`` for
      the parameters of ``block(params, x)``.
    min_bytes: values smaller than this are not worth a transfer and stay on
      device (default 64 KiB; 0 moves everything). Sizes are global (before
      sharding): inside ``jit`` the per-device shard size is not known.
    bandwidth: one-direction host link bandwidth in bytes/s assumed by
      the planner (:class:`HostLink`); ``None`` uses a per-backend default
      (gpu 50e9, tpu 25e9, cpu 10e9).
    latency: fixed cost of one transfer in seconds, for the same cost model.

  Returns:
    A frozen, hashable :class:`HostOffload`.

  Raises:
    TypeError: if ``argnums`` is not None or non-negative ints, ``exclude_argnums``
      is not non-negative ints, or ``min_bytes``
      is not a non-negative int.
    ValueError: if ``bandwidth`` or ``latency`` is not a positive (non-negative)
      finite number.

  Example:

    >>> import jax, jax.numpy as jnp, remat, warnings
    >>> block = lambda w, x: jnp.tanh(jnp.tanh(x @ w) @ w)
    >>> ck = remat.checkpoint(block, offload=remat.offload.host(argnums=1, min_bytes=0))
    >>> w, x = jnp.eye(3), jnp.ones((2, 3))
    >>> with warnings.catch_warnings():
    ...   warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    ...   g = jax.grad(lambda w: ck(w, x).sum())(w)
    >>> bool(jnp.allclose(g, jax.grad(lambda w: block(w, x).sum())(w)))
    True
  """
  return HostOffload(argnums=argnums, exclude_argnums=exclude_argnums,  # type: ignore[arg-type]
                     min_bytes=min_bytes, bandwidth=bandwidth, latency=latency)


class Placement(NamedTuple):
  """One memory-kind placement in a lowered program: ``value = place(source)`` in ``memory_kind``."""

  value: str        # the placed value's name in the module (``%12``)
  source: str       # the value it was placed from
  memory_kind: str  # ``"pinned_host"`` or ``"device"``
  type: str         # its tensor type, e.g. ``tensor<32x16xf32>``


_PLACEMENT = re.compile(r"(%[\w#]+) = stablehlo.custom_call @annotate_device_placement\((%[\w#]+)\)[^\n]*?"
                        r"_xla_buffer_placement = \"(\w+)\"[^\n]*?: \((tensor<[^>]*>)")


def placements(fn: Callable, *args, platform: str = "cuda") -> list[Placement]:
  """The memory-kind placements in ``fn(*args)`` lowered for ``platform``, in program order.

  XLA:CPU drops placements when it compiles, so on a CPU machine this is how
  to see what a GPU would move: the program is exported for ``platform``
  with ``jax.export`` (``fn`` may be jitted, with shardings).

  Args:
    fn: the function (e.g. a training step).
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct``).
    platform: ``"cuda"``, ``"rocm"`` or ``"tpu"``.

  Returns:
    A list of :class:`Placement`; moves to host have ``memory_kind == "pinned_host"``.

  Example:

    >>> import jax, jax.numpy as jnp, remat, warnings
    >>> block = remat.checkpoint(lambda w, x: jnp.tanh(x @ w),
    ...                          offload=remat.offload.host(argnums=1, min_bytes=0))
    >>> with warnings.catch_warnings():
    ...   warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    ...   p = remat.offload.placements(jax.grad(lambda w, x: block(w, x).sum()), jnp.eye(4), jnp.ones((2, 4)))
    >>> [(q.memory_kind, q.type) for q in p]
    [('pinned_host', 'tensor<2x4xf32>'), ('device', 'tensor<2x4xf32>')]
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  exported = jax.export.export(jitted, platforms=[platform])(*args)
  return [Placement(*m) for m in _PLACEMENT.findall(exported.mlir_module())]


### Implementation


def validate_offload(offload: Any, *, api: str) -> None:
  """Raises a TypeError if ``offload`` is not an offload policy (called at build time)."""
  if isinstance(offload, HostOffload):
    return
  hint = ""
  if offload is host or offload is HostOffload:
    hint = " You passed the factory itself; call it: `offload=remat.offload.host()`."
  elif isinstance(offload, str):
    hint = " Memory kinds are chosen by the policy; use `offload=remat.offload.host()`."
  raise TypeError(
      f"the `offload` argument to {api} must be None or a `remat.offload` policy such as "
      f"`remat.offload.host()`, but got {offload!r} of type {type(offload).__name__}.{hint}")


@jax.tree_util.register_pytree_node_class
class _Offloaded:
  """Residual leaves plus which of them are on host (static), so the backward
  pass moves back exactly what the forward pass moved."""

  def __init__(self, leaves, treedef, mask):
    self.leaves = list(leaves)
    self.treedef = treedef
    self.mask = mask

  def tree_flatten(self):
    return self.leaves, (self.treedef, self.mask)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    return cls(leaves, *aux)


def _positions(value, name: str, fix: str) -> tuple[int, ...]:
  nums = (value,) if _is_int(value) else value
  try:
    nums = tuple(nums)
  except TypeError:
    nums = None
  if nums is None or not all(_is_int(i) and i >= 0 for i in nums):
    raise TypeError(
        f"the `{name}` argument to {_API} must be a non-negative int or a tuple of them"
        f"{' (or None)' if name == 'argnums' else ''}, but got {value!r}. Pass {fix}.")
  return tuple(sorted({int(i) for i in nums}))


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _movable(x) -> bool:
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    return False
  if x.dtype == jax.dtypes.float0 or jnp.issubdtype(x.dtype, jax.dtypes.extended):
    return False  # PRNG keys and other extended dtypes: tiny, and not placeable everywhere
  space = getattr(jax.typeof(x), "memory_space", _DEVICE)
  return space != _HOST


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * int(np.dtype(x.dtype).itemsize)


def _warn_if_not_executed(count: int, nbytes: int) -> None:
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return
  name = platform(device.platform)
  if supported(device) or name in _WARNED:
    return
  _WARNED.add(name)
  warnings.warn(
      f"{_API}: the {name!r} backend does not execute memory-kind moves. XLA:{name.upper()} "
      f"accepts the `pinned_host` placements but drops them, so the {count} residual(s) "
      f"({nbytes:,} bytes in this trace) marked for offload stay in device memory. Results are "
      "exact; device memory is not reduced. On GPU and TPU they move to host memory "
      "(`remat.offload.supported()` tells which); to inspect the GPU program from here, lower "
      "it with `jax.export.export(jax.jit(f), platforms=['cuda'])`. This warning is shown once.",
      OffloadNotExecutedWarning, stacklevel=4)
