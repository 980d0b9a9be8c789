"""``Plan``: a checkpointing schedule as data, and its predicted cost (numpy-free, jax-free).

A plan is a tree of :class:`Segment`s over a chain of ``num_layers`` layers.
A segment covers the layers ``[start, stop)``. It either runs its layers
*taped* (plain backprop inside: every layer keeps its residuals), or runs its
``children`` in order. A segment with ``checkpoint=True`` is wrapped in
``remat.checkpoint``: its forward pass keeps only its input, and its backward
pass recomputes the inside (with the inside's own structure, so checkpoints
nest).

Cost model (the definitions every number of a plan follows):

* ``forward_evaluations``: layer forward calls in one training step
  (``jax.value_and_grad`` of a loss of the chain output), the taped forward
  included. A checkpointed segment costs its layers once in the forward pass
  (without tape) and again, with its own structure, in the backward pass;
  inside a recomputation the output is unused, so the forward of a trailing
  checkpointed sub-segment is dead code and is not counted (XLA removes it).
  The count assumes each layer's backward needs its forward (true for layers
  ending in a nonlinearity); XLA may also drop the forward of the last taped
  layer of a recomputation when its backward does not need it (a purely
  linear layer).
  (With ``jax.grad`` alone, XLA may drop the forward of the last checkpointed
  segment as dead code; the definition uses ``value_and_grad``.)
* ``stored_states``: the most layer-boundary activations held for the backward
  pass at once -- inputs of checkpointed segments and of taped layers, the
  chain input included -- not counting the input of the one layer being
  differentiated at that moment (the working state). This is
  Griewank--Walther's count of checkpoint slots.
* bytes: with measured per-layer costs (:class:`LayerCost`), a taped layer
  keeps ``kept_bytes`` until its backward and needs ``transient_bytes`` more
  while its forward or backward runs; a checkpointed segment keeps its input
  (free when that activation is already held: the chain input, which is an
  argument, or the input of an enclosing checkpoint); a forward pass without
  tape holds a layer's input and output. ``predicted_peak_bytes`` is the peak
  of that simulation: a prediction of ``remat.profile(step).temp_bytes``.

Executing a plan (nested ``remat.checkpoint``s, keys, scans) is ``execute.py``'s job.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Hashable, Sequence

from remat._src.util.units import format_bytes

### Data


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """Measured (or assumed) costs of one layer of a chain.

  Attributes:
    input_bytes: bytes of the layer's input activation (a layer boundary).
    output_bytes: bytes of its output activation.
    kept_bytes: what one more *taped* layer adds to the memory held for the
      backward pass (its residuals, measured as a difference of two compiles).
    transient_bytes: the extra working memory while its forward or backward
      runs (buffers that die inside the layer, cotangents).
    flops: forward flops.
    step_flops: flops of its taped forward plus its backward.
    forward_transient_bytes: working memory of its forward pass without tape
      (internal buffers beyond its input and output).
    policies: ``(option, cost)`` pairs: the layer's costs when it runs taped
      under a recomputation policy (``"dots"``, ``"save(query_proj,...)"``:
      see ``remat/_src/core/policies.py``) instead of keeping everything.
  """

  input_bytes: int
  output_bytes: int
  kept_bytes: int
  transient_bytes: int
  flops: float
  step_flops: float
  forward_transient_bytes: int = 0
  policies: tuple[tuple[str, LayerCost], ...] = ()

  def under(self, policy: str | None) -> LayerCost:
    """The costs of this layer taped under ``policy`` (``None``: keep everything)."""
    if policy is None:
      return self
    for name, cost in self.policies:
      if name == policy:
        return cost
    raise ValueError(f"no measured costs for the policy {policy!r} of this layer; measured: "
                     f"{[n for n, _ in self.policies]}. Plan with the same costs the plan was made from.")


@dataclasses.dataclass(frozen=True)
class Segment:
  """Layers ``[start, stop)`` run taped (no ``children``) or as ``children`` in order.

  Attributes:
    start: first layer.
    stop: one past the last layer.
    children: sub-segments covering ``[start, stop)`` in order; empty means
      every layer in the range runs taped.
    checkpoint: wrap this segment in ``remat.checkpoint`` (keep its input,
      recompute inside in the backward pass).
    offload: with ``checkpoint``, keep the stored input in host memory
      (``pinned_host``) between the forward and the backward pass
      (``remat.offload.host``).
    policy: for taped layers (no ``children``, no ``checkpoint``), run each
      under this recomputation policy (``"dots"``, ``"save(query_proj,key_proj)"``
      ...): it keeps what the policy saves and recomputes the rest in its own
      backward pass. ``None`` keeps everything.
  """

  start: int
  stop: int
  children: tuple[Segment, ...] = ()
  checkpoint: bool = False
  offload: bool = False
  policy: str | None = None

  def __post_init__(self):
    if not 0 <= self.start < self.stop:
      raise ValueError(f"a `remat.segmenters.Segment` needs 0 <= start < stop, but got "
                       f"[{self.start}, {self.stop}).")
    if self.offload and not self.checkpoint:
      raise ValueError(f"`remat.segmenters.Segment` [{self.start}, {self.stop}): only a checkpointed "
                       "segment's stored input can be offloaded; pass `checkpoint=True` with `offload=True`.")
    if self.policy is not None and (self.children or self.checkpoint):
      raise ValueError(f"`remat.segmenters.Segment` [{self.start}, {self.stop}): a `policy` applies to "
                       "taped layers; give it to a segment without `children` and without `checkpoint`.")
    if self.children:
      edges = [self.start] + [c.stop for c in self.children]
      starts = [c.start for c in self.children]
      if starts != edges[:-1] or edges[-1] != self.stop:
        raise ValueError(
            f"the children of `remat.segmenters.Segment` [{self.start}, {self.stop}) must tile it in order, "
            f"but got {[(c.start, c.stop) for c in self.children]}.")

  @property
  def size(self) -> int:
    return self.stop - self.start

  def lines(self, indent: int = 0) -> list[str]:
    pad = "  " * indent
    what = "checkpoint" if self.checkpoint else ("tape" if not self.children else "segment")
    rng = f"[{self.start}, {self.stop})" if self.size > 1 else f"[{self.start}]"
    how = f" ({_describe_policy(self.policy)})" if self.policy is not None else ""
    out = [f"{pad}{what} {rng}{how}" + (" (input offloaded to host)" if self.offload else "")]
    for c in self.children:
      out += c.lines(indent + 1)
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
  """A checkpointing schedule for a chain of layers, with its predicted cost.

  Attributes:
    root: the outermost :class:`Segment` (covers the whole chain, never
      checkpointed itself).
    num_layers: length of the chain.
    forward_evaluations: layer forward calls in one ``value_and_grad`` step,
      the taped forward included.
    stored_states: the most boundary activations held at once, chain input
      included, working state excluded (Griewank--Walther slots).
    predicted_peak_bytes: predicted compiled temp memory of the step, or
      ``None`` when the costs carry no bytes.
    predicted_flops: predicted flops of the step (forward + backward +
      recomputation), or ``None`` when unknown.
    made_by: what made the plan, in words (``"sqrt() = every(8)"``); formerly
      ``segmenter`` (still readable, deprecated: it is a description, not a segmenter).
    compiled_temp_bytes: the compiled temp memory of the step when the plan
      was verified by compiling it (``budget``), else ``None``.
    layer_evaluations: forward evaluations of each layer (they sum to
      ``forward_evaluations``).
    offloaded_bytes: bytes of the stored boundary activations the plan keeps
      in host memory (the inputs of segments with ``offload=True``).
  """

  root: Segment
  num_layers: int
  forward_evaluations: int
  stored_states: int
  predicted_peak_bytes: int | None
  predicted_flops: float | None
  made_by: str = ""
  compiled_temp_bytes: int | None = None
  layer_evaluations: tuple[int, ...] = dataclasses.field(default=(), repr=False)
  offloaded_bytes: int = 0

  @classmethod
  def from_tree(cls, root: Segment, costs: Sequence[LayerCost] | None = None, *,
                made_by: str = "custom", **deprecated) -> Plan:
    """The plan of a hand-made segment tree, evaluated under the cost model.

    Example:

      >>> from remat.segmenters import Plan, Segment
      >>> two = (Segment(0, 2, checkpoint=True), Segment(2, 4, checkpoint=True))
      >>> Plan.from_tree(Segment(0, 4, two)).forward_evaluations
      8
    """
    if set(deprecated) - {"segmenter"}:
      raise TypeError(f"`remat.segmenters.Plan.from_tree` got unexpected keywords {sorted(deprecated)}.")
    if "segmenter" in deprecated:
      warnings.warn("`Plan.from_tree(segmenter=...)` is now `Plan.from_tree(made_by=...)`: the "
                    "string describes what made the plan.", DeprecationWarning, stacklevel=2)
      made_by = deprecated["segmenter"]
    return make_plan(root, costs, root.stop, made_by)

  @property
  def segmenter(self) -> str:
    """Deprecated name of :attr:`made_by` (a description, not a :class:`Segmenter`)."""
    warnings.warn("`Plan.segmenter` is now `Plan.made_by`: the string describes what made the "
                  "plan.", DeprecationWarning, stacklevel=2)
    return self.made_by

  @property
  def layer_policies(self) -> tuple[str | None, ...]:
    """The recomputation policy each layer is taped under (``None``: keeps everything)."""
    out: list[str | None] = [None] * self.num_layers

    def walk(seg):
      if not seg.children:
        out[seg.start:seg.stop] = [seg.policy] * seg.size
      for c in seg.children:
        walk(c)
    walk(self.root)
    return tuple(out)

  @property
  def recomputes(self) -> bool:
    """Whether the plan recomputes anything: whole layers, or inside layers under a policy."""
    return self.recomputed_evaluations > 0 or any(p is not None for p in self.layer_policies)

  @property
  def recomputed_evaluations(self) -> int:
    """Forward evaluations beyond the ``num_layers`` of plain backprop (whole layers)."""
    return self.forward_evaluations - self.num_layers

  @property
  def policy_layers(self) -> int:
    """Layers taped under a recomputation policy: each recomputes part of its forward pass
    (what the policy does not save) in the backward pass, beyond ``recomputed_evaluations``."""
    return sum(p is not None for p in self.layer_policies)

  def recomputation(self) -> str:
    """What the plan recomputes, in words: whole layers, and layers partly under a policy.

    Example:

      >>> import remat
      >>> remat.segmenters.every(2).plan(4).recomputation()
      '4 recomputed'
    """
    text = f"{self.recomputed_evaluations} recomputed"
    if self.policy_layers:
      text += f", {self.policy_layers} layer(s) recomputing part of their forward under a policy"
    return text

  def __str__(self) -> str:
    head = (f"Plan({self.made_by or 'custom'}, {self.num_layers} layers): "
            f"{self.forward_evaluations} forward evaluations ({self.recomputation()}), "
            f"{self.stored_states} stored states")
    if self.predicted_peak_bytes is not None:
      head += f", predicted temp {format_bytes(self.predicted_peak_bytes)}"
    if self.compiled_temp_bytes is not None:
      head += f", compiled temp {format_bytes(self.compiled_temp_bytes)}"
    if self.predicted_flops is not None:
      head += f", {self.predicted_flops / 1e9:,.3f} GFLOP"
    if self.offloaded_bytes:
      head += f", {format_bytes(self.offloaded_bytes)} offloaded to host"
    return "\n".join([head] + self.root.lines(1))


@dataclasses.dataclass(frozen=True)
class Verifier:
  """How a segmenter can check a plan against the compiler (given by ``remat.sequential``).

  Attributes:
    key: identifies the chain at its shapes (the layers' jaxprs, shardings);
      verified plans are cached under it.
    temp_bytes: ``temp_bytes(plan)`` compiles the chain's reference step under
      ``plan`` and returns its per-device temp bytes.
    global_shapes: the chain runs on a mesh whose layout XLA chooses later (an
      ``Auto`` mesh under ``jit``), so costs and ``temp_bytes`` are global.
  """

  key: Hashable
  temp_bytes: Callable[[Plan], int] = dataclasses.field(compare=False)
  global_shapes: bool = False


### Evaluating a tree under the cost model


def forward_peak(c: LayerCost, fresh_input: bool = True) -> float:
  """Memory a taped layer's forward pass adds while it runs: its input (unless someone already
  holds it), its working set and its output (docs/facts.md, fact 16)."""
  return (float(c.input_bytes) if fresh_input else 0.0) + float(c.forward_transient_bytes + c.output_bytes)


def backward_transient(costs: Sequence[LayerCost], i: int, policy: str | None = None) -> float:
  """Working memory of layer ``i``'s backward: its transient and the incoming cotangent."""
  c = costs[i].under(policy)
  return float(c.transient_bytes) + (float(c.output_bytes) if i < len(costs) - 1 else 0.0)


def leaf(start: int, stop: int, checkpoint: bool = False, policy: str | None = None) -> Segment:
  return Segment(start, stop, (), checkpoint, policy=policy)


def _describe_policy(option: str) -> str:
  if option.startswith("save("):
    inner = option[5:-1]
    return f"save {inner.replace(',', ', ')}" if inner else "save only the input"
  return {"dots": "save matmul outputs", "dots_no_batch": "save matmul outputs without batch dims"}.get(
      option, option)


def make_plan(root: Segment, costs: Sequence[LayerCost] | None, num_layers: int, made_by: str,
              compiled_temp_bytes: int | None = None) -> Plan:
  """Evaluates ``root`` and returns the :class:`Plan`."""
  if root.start != 0 or root.stop != num_layers or root.checkpoint:
    raise ValueError(f"a plan's root must be an unchecked segment [0, {num_layers}), got {root}.")
  sim = _Simulator(costs, num_layers)
  sim.run(root)
  return Plan(root=root, num_layers=num_layers, forward_evaluations=sim.evals,
              stored_states=sim.max_states,
              predicted_peak_bytes=None if costs is None or sim.unit else int(sim.peak),
              predicted_flops=None if costs is None else float(sim.flops),
              made_by=made_by, compiled_temp_bytes=compiled_temp_bytes,
              offloaded_bytes=int(sim.offloaded),
              layer_evaluations=tuple(sim.per_layer))


class _Simulator:
  """Walks the schedule of a tree: evaluations, held boundary states, bytes, flops."""

  def __init__(self, costs, n):
    self.unit = costs is None
    self.costs = costs
    self.n = n
    self.evals = 0
    self.per_layer = [0] * n
    self.flops = 0.0
    self.held = 0.0           # bytes held
    self.peak = 0.0
    self.states: dict[int, int] = {0: 1}  # boundary index -> holders; chain input held by the caller
    self.max_states = 0
    self.offloaded = 0.0      # bytes of stored inputs placed in host memory

  def _c(self, i) -> LayerCost:
    return self.costs[i]

  def _bump(self, extra=0.0):
    self.peak = max(self.peak, self.held + extra)

  def _hold_state(self, i):
    self.states[i] = self.states.get(i, 0) + 1

  def _drop_state(self, i):
    self.states[i] -= 1
    if not self.states[i]:
      del self.states[i]

  def _count_states(self, working=None):
    n = len(self.states) - (1 if working in self.states else 0)
    self.max_states = max(self.max_states, n)

  def run(self, root: Segment):
    keeps = self.taped(root)
    self.backward(root, keeps)

  # A boundary activation held by a checkpoint costs bytes unless it is already held.
  def _state_bytes(self, i):
    if self.unit or i in self.states:
      return 0.0
    return float(self._c(i).input_bytes)

  def taped(self, seg: Segment, output_needed: bool = True):
    """Forward under AD. Returns what the backward must release.

    In a recomputation the segment's output is not used (only its tape is), so
    a trailing checkpointed segment's forward is dead code: XLA drops it.
    """
    if seg.checkpoint:
      b = self._state_bytes(seg.start)
      first_input = 0.0
      if seg.offload and not self.unit:
        # On device while the segment's forward reads it, then in host memory
        # until the backward pass brings it back.
        self.offloaded += b
        first_input, b = b, 0.0
      self.held += b
      self._hold_state(seg.start)
      for i in range(seg.start, seg.stop if output_needed else seg.start):  # forward without tape
        self.evals += 1
        self.per_layer[i] += 1
        if not self.unit:
          c = self._c(i)
          self.flops += c.flops
          inp = first_input if i == seg.start else c.input_bytes
          self._bump(inp + c.output_bytes + c.forward_transient_bytes)
      self._count_states()
      return ("ckpt", (b, first_input))
    if seg.children:
      last = len(seg.children) - 1
      return ("seq", [self.taped(c, output_needed or j < last) for j, c in enumerate(seg.children)])
    kept = []
    for i in range(seg.start, seg.stop):
      self.evals += 1
      self.per_layer[i] += 1
      fresh = i not in self.states  # its input is the previous layer's output, not held yet
      self._hold_state(i)
      self._count_states(working=i)
      if not self.unit:
        c = self._c(i).under(seg.policy)
        self.flops += c.step_flops
        self._bump(forward_peak(c, fresh))
        self.held += c.kept_bytes
        kept.append(c.kept_bytes)
    return ("tape", kept)

  def backward(self, seg: Segment, keeps):
    kind, data = keeps
    if kind == "ckpt":
      data, back = data
      self.held += back  # an offloaded input is on device again for the recomputation
      inner = dataclasses.replace(seg, checkpoint=False, offload=False)
      inner_keeps = self.taped(inner, output_needed=False)
      self.backward(inner, inner_keeps)
      self.held -= data + back
      self._drop_state(seg.start)
      return
    if kind == "seq":
      for c, k in zip(reversed(seg.children), reversed(data), strict=True):
        self.backward(c, k)
      return
    for j, i in enumerate(reversed(range(seg.start, seg.stop))):
      self._count_states(working=i)
      if not self.unit:
        self._bump(backward_transient(self.costs, i, seg.policy))
        self.held -= data[len(data) - 1 - j]
      self._drop_state(i)


### Plans that run as nested scans


Levels = list[tuple[int, bool]]


def regular_levels(plan_or_root: Plan | Segment) -> Levels | None:
  """``[(count, checkpoint), ...]`` from the outside in when every level is uniform, else None.

  Such a plan runs as nested ``lax.scan``s. Plans with an offloaded input are
  not scanned: every segment of a scan is the same program. For the same
  reason a :class:`Plan` whose per-layer attributes (``layer_policies``, when
  plans carry them) differ between layers is not regular.
  """
  if isinstance(plan_or_root, Plan):
    names = plan_or_root.layer_policies
    if any(p != names[0] for p in names):
      return None
    plan_or_root = plan_or_root.root
  return _levels(plan_or_root)


def _levels(root: Segment) -> Levels | None:
  if _has_offload(root):
    return None
  if not root.children:
    return [(root.size, False)]
  first = root.children[0]
  shape = _shape(first)
  if any(_shape(c) != shape for c in root.children):
    return None
  inner = _levels(dataclasses.replace(first, checkpoint=False))
  if inner is None:
    return None
  return [(len(root.children), first.checkpoint)] + inner


def _has_offload(seg: Segment) -> bool:
  return seg.offload or any(_has_offload(c) for c in seg.children)


def _shape(seg: Segment):
  return (seg.size, seg.checkpoint, tuple(_shape(c) for c in seg.children))
