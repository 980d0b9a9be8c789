"""Proof on a lent GPU that remat runs there and that `remat.offload` moves activations to host.

One command, one process, under a time budget (``--budget-s``, default 330 s), in four parts:

1. **Offload and peers** on a decoder-only transformer (defined here), one training step per plan:

   =================  ===================================================================
   plain              ``jax.value_and_grad``, every activation kept on device
   jax_checkpoint     ``jax.checkpoint`` per block (the peer)
   remat              ``remat.checkpoint`` per block: keep block inputs, recompute inside
   offload            the same, with the kept block inputs in ``pinned_host``
   offload_dots       ``dots_with_no_batch_dims_saveable`` + offload: projections on host
   jax_offload_dots   jax's ``offload_dot_with_no_batch_dims`` policy (the offload peer)
   nn_remat           the same block as a ``flax.linen`` Module under ``nn.remat``
   remat_linen        ... under ``remat.linen.checkpoint``
   =================  ===================================================================

   On a GPU/TPU it CHECKS, for ``offload`` and ``offload_dots``: ``S(5)`` (host memory space)
   buffers in the optimized HLO, ``memory_analysis().host_temp_size_in_bytes > 0``, and device
   temp below ``remat``'s; and that every plan's loss and gradient norm agree with ``plain``.
2. **Step times**: median of interleaved runs in this process, as ratios (``remat`` against
   ``jax_checkpoint``, ``remat_linen`` against ``nn_remat``, offload against ``remat``).
3. **A planned chain**: ``remat.sequential`` with ``remat.segmenters.budget`` (and, with
   ``offload=``, where offload runs), compiled and run here; ``remat.fit`` too where it exists.
4. **The core tests** (``tests/test_{transform,linen,nnx,planner}.py``) with pytest in a child
   process, in the time left, reporting pass/fail counts (a test written for XLA:CPU's memory
   behaviour may fail on a GPU: the failures are listed, not hidden).

It writes ``gpu_check.csv`` (one measurement a row), ``gpu_check.md`` (the summary) and
``tests.log`` under ``--out`` (default ``$OUT``, else ``./gpu_out``), prints the summary last and
exits 1 if a check failed.

``--cpu-smoke`` runs all of it quickly on any machine: tiny sizes, the offload placements read
from the module lowered for CUDA (``jax.export``), the host-memory checks reported as skipped on
CPU (XLA:CPU drops memory-kind moves: docs/facts.md, fact 5), and the tests only collected. The
exact device command is in docs/gpu.md.

Self-contained on purpose: it imports remat, jax, flax, numpy and the standard library only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import gc
import importlib
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

# The test child shares the GPU with this process: neither may grab 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import remat  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
  batch: int
  seq: int
  width: int
  heads: int
  layers: int
  dtype: str
  chain_depth: int  # the planned chain (part 3)
  chain_batch: int
  chain_width: int
  chain_budget: float  # fraction of plain backprop's compiled temp


# FULL: the plain transformer step needs about 10-20 GB on an H200; the chain, 2 GB.
FULL = Size(batch=8, seq=1024, width=1024, heads=8, layers=12, dtype="bfloat16",
            chain_depth=32, chain_batch=4096, chain_width=1024, chain_budget=0.4)
SMOKE = Size(batch=2, seq=32, width=32, heads=4, layers=3, dtype="float32",
             chain_depth=16, chain_batch=128, chain_width=32, chain_budget=0.6)

PLANS = ("plain", "jax_checkpoint", "remat", "offload", "offload_dots", "jax_offload_dots",
         "nn_remat", "remat_linen")
OFFLOAD_PLANS = ("offload", "offload_dots")
CORE_TESTS = ("tests/test_transform.py", "tests/test_linen.py", "tests/test_nnx.py",
              "tests/test_planner.py")


### Model


def init(size: Size, key):
  d, dt = size.width, jnp.dtype(size.dtype)
  params = []
  for k in jax.random.split(key, size.layers):
    k1, k2, k3, k4 = jax.random.split(k, 4)
    params.append({
        "wqkv": (jax.random.normal(k1, (d, 3 * d)) / math.sqrt(d)).astype(dt),
        "wo": (jax.random.normal(k2, (d, d)) / math.sqrt(d)).astype(dt),
        "w1": (jax.random.normal(k3, (d, 4 * d)) / math.sqrt(d)).astype(dt),
        "w2": (jax.random.normal(k4, (4 * d, d)) / math.sqrt(4 * d)).astype(dt),
        "g1": jnp.ones((d,), dt),
        "g2": jnp.ones((d,), dt),
    })
  x = jax.random.normal(jax.random.fold_in(key, 7), (size.batch, size.seq, d)).astype(dt)
  return params, x


def rmsnorm(x, g):
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype) * g


def block(p, x, *, heads):
  b, s, d = x.shape
  dh = d // heads
  qkv = rmsnorm(x, p["g1"]) @ p["wqkv"]
  q, k, v = (t.reshape(b, s, heads, dh) for t in jnp.split(qkv, 3, axis=-1))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(dh)
  causal = jnp.tril(jnp.ones((s, s), bool))
  probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1).astype(x.dtype)
  attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
  x = x + attn @ p["wo"]
  return x + jax.nn.gelu(rmsnorm(x, p["g2"]) @ p["w1"]) @ p["w2"]


class Block(nn.Module):
  """``block`` as a linen Module reading the same parameters (for nn.remat against ours)."""

  heads: int

  @nn.compact
  def __call__(self, x):
    d, zeros = x.shape[-1], nn.initializers.zeros
    shapes = dict(wqkv=(d, 3 * d), wo=(d, d), w1=(d, 4 * d), w2=(4 * d, d), g1=(d,), g2=(d,))
    p = {n: self.param(n, zeros, shape, x.dtype) for n, shape in shapes.items()}
    return block(p, x, heads=self.heads)


def make_step(plan: str, heads: int, lr: float = 1e-3):
  blk = functools.partial(block, heads=heads)
  host = remat.offload.host(argnums=1, min_bytes=0)
  if plan in ("nn_remat", "remat_linen"):
    cls = nn.remat(Block) if plan == "nn_remat" else remat.linen.checkpoint(Block)
    mod = cls(heads=heads)
    layer = lambda p, x: mod.apply({"params": p}, x)
  else:
    layer = {
        "plain": blk,
        "jax_checkpoint": jax.checkpoint(blk),
        "remat": remat.checkpoint(blk),
        "offload": remat.checkpoint(blk, offload=host),
        "offload_dots": remat.checkpoint(
            blk, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable, offload=host),
        "jax_offload_dots": jax.checkpoint(blk, policy=jax.checkpoint_policies.offload_dot_with_no_batch_dims(
            "device", "pinned_host")),
    }[plan]

  def loss(params, x):
    for p in params:
      x = layer(p, x)
    return jnp.mean(jnp.square(x.astype(jnp.float32)))

  def step(params, x):
    value, grads = jax.value_and_grad(loss)(params, x)
    gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    new = jax.tree.map(lambda p, g: (p - lr * g).astype(p.dtype), params, grads)
    return value, gnorm, new

  return step


### Recording


class Report:
  """Rows for the CSV, checks for the summary."""

  def __init__(self):
    self.rows: list[dict] = []
    self.checks: list[tuple[str, str, str]] = []  # (status, name, detail)
    self.notes: list[str] = []
    self.sections: dict[str, str] = {}

  def row(self, part, name, metric, value, unit="", note=""):
    self.rows.append(dict(part=part, name=name, metric=metric, value=value, unit=unit, note=note))

  def check(self, name, ok, detail="", skip_reason=None, incomplete=False):
    """PASS / FAIL; SKIPPED (with the reason) where it cannot run here; INCOMPLETE if out of time."""
    status = "SKIPPED" if skip_reason else ("FAIL" if not ok else "INCOMPLETE" if incomplete else "PASS")
    self.checks.append((status, name, skip_reason or detail))
    print(f"  [{status}] {name}: {skip_reason or detail}", flush=True)

  def failed(self):
    return [c for c in self.checks if c[0] == "FAIL"]


def fmt_bytes(n):
  return f"{n / 2**30:.3f} GiB" if abs(n) >= 2**28 else f"{n / 2**20:.2f} MiB"


def versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0]}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      out[name] = importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001
      out[name] = "-"
  return out


### Part 1 and 2: offload, peers, step times


def cuda_placements(size, params, x):
  """``pinned_host`` / ``device`` placements in the offload step lowered for CUDA (any machine)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    exp = jax.export.export(jax.jit(make_step("offload", size.heads)), platforms=["cuda"])(params, x)
  return re.findall(r'_xla_buffer_placement = "(\w+)"', exp.mlir_module())


def part_offload(rep: Report, size, accel, rounds, backend):
  params0, x = init(size, jax.random.key(0))
  placed = cuda_placements(size, params0, x)
  n_host, n_dev = placed.count("pinned_host"), placed.count("device")
  rep.row("offload", "offload", "cuda_lowering_pinned_host_placements", n_host)
  rep.check("CUDA lowering of `offload` moves each block input to pinned_host and back",
            (n_host, n_dev) == (size.layers, size.layers),
            f"{n_host} pinned_host / {n_dev} device placements, expected {size.layers} each")

  compiled, stats = {}, {}
  for plan in PLANS:
    step = jax.jit(make_step(plan, size.heads), donate_argnums=0)
    t0 = time.perf_counter()
    c = step.lower(params0, x).compile(remat.compiler_options(backend))
    secs = time.perf_counter() - t0
    mem, cost = c.memory_analysis(), c.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else cost
    hlo = c.as_text() or ""
    compiled[plan] = c
    stats[plan] = dict(temp=int(mem.temp_size_in_bytes), host_temp=int(mem.host_temp_size_in_bytes),
                       flops=float((cost or {}).get("flops", float("nan"))),
                       s5=len(re.findall(r"S\(5\)", hlo)), compile_s=secs)
    for metric, unit in (("temp", "bytes"), ("host_temp", "bytes"), ("flops", "flop"), ("s5", "count"),
                         ("compile_s", "s")):
      rep.row("offload", plan, metric, stats[plan][metric], unit)
    s = stats[plan]
    print(f"  compiled {plan:<17} temp {fmt_bytes(s['temp']):>12}  host temp "
          f"{fmt_bytes(s['host_temp']):>12}  S(5) {s['s5']:>4}  {secs:5.1f} s", flush=True)

  # Same start, one step each: every plan must agree with plain.
  first = {}
  for plan in PLANS:
    loss, gnorm, _ = compiled[plan](jax.tree.map(jnp.copy, params0), x)
    first[plan] = (float(loss), float(gnorm))
    rep.row("offload", plan, "loss", first[plan][0])
    rep.row("offload", plan, "grad_norm", first[plan][1])
  tol = 2e-2 if size.dtype == "bfloat16" else 1e-4
  bad = [f"{plan} {name} {a:.6g} vs {b:.6g}" for plan in PLANS[1:]
         for name, a, b in zip(("loss", "grad norm"), first[plan], first["plain"], strict=True)
         if not abs(a - b) <= tol * max(abs(b), 1e-12)]
  rep.check("every plan's loss and gradient norm equal plain's", not bad,
            "; ".join(bad) or f"all within relative {tol}")

  gpu_only = None if accel else f"skipped on {backend}: XLA:CPU does not execute memory-kind moves"
  for plan in OFFLOAD_PLANS:
    s = stats[plan]
    rep.check(f"`{plan}`: S(5) host-memory buffers in the optimized HLO", s["s5"] > 0,
              f"{s['s5']} S(5) layouts", skip_reason=gpu_only)
    rep.check(f"`{plan}`: memory_analysis().host_temp_size_in_bytes > 0", s["host_temp"] > 0,
              fmt_bytes(s["host_temp"]), skip_reason=gpu_only)
  s_off, s_rem = stats["offload"], stats["remat"]
  rep.check("`offload` device temp below `remat` (block inputs moved off the device)",
            s_off["temp"] < s_rem["temp"],
            f"{fmt_bytes(s_off['temp'])} vs {fmt_bytes(s_rem['temp'])} "
            f"({s_off['temp'] / max(s_rem['temp'], 1):.3f}x)", skip_reason=gpu_only)

  # Interleaved timing: median seconds per step.
  state = {plan: jax.tree.map(jnp.copy, params0) for plan in PLANS}
  for plan in PLANS:  # warm up
    for _ in range(2):
      _, _, state[plan] = compiled[plan](state[plan], x)
    jax.block_until_ready(state[plan])
  times = {plan: [] for plan in PLANS}
  for _ in range(rounds):
    for plan in PLANS:
      t0 = time.perf_counter()
      out = compiled[plan](state[plan], x)
      jax.block_until_ready(out)
      times[plan].append(time.perf_counter() - t0)
      state[plan] = out[2]
  med = {plan: statistics.median(ts) for plan, ts in times.items()}
  for plan in PLANS:
    rep.row("time", plan, "median_step_s", med[plan], "s", f"{rounds} interleaved rounds")
  ratios = [("remat", "jax_checkpoint"), ("remat_linen", "nn_remat"), ("offload", "remat"),
            ("offload_dots", "jax_offload_dots"), ("remat", "plain")]
  for a, b in ratios:
    rep.row("time", f"{a}/{b}", "step_time_ratio", med[a] / med[b])

  lines = ["| plan | device temp | host temp | S(5) | GFLOP | step ms | x plain | compile s | loss |",
           "|---|---|---|---|---|---|---|---|---|"]
  for plan in PLANS:
    s = stats[plan]
    lines.append(f"| {plan} | {fmt_bytes(s['temp'])} | {fmt_bytes(s['host_temp'])} | {s['s5']} | "
                 f"{s['flops'] / 1e9:.4g} | {med[plan] * 1e3:.2f} | {med[plan] / med['plain']:.2f} | "
                 f"{s['compile_s']:.1f} | {first[plan][0]:.6g} |")
  lines += ["", "| pair | step-time ratio | device temp ratio |", "|---|---|---|"]
  for a, b in ratios:
    lines.append(f"| `{a}` / `{b}` | {med[a] / med[b]:.3f} | "
                 f"{stats[a]['temp'] / max(stats[b]['temp'], 1):.3f} |")
  rep.sections["Offload, peers and step times"] = (
      f"Transformer: {size.layers} blocks, width {size.width}, batch {size.batch}, sequence "
      f"{size.seq}, {size.dtype}; one training step per plan; time is the median of {rounds} "
      "interleaved runs in this process.\n\n" + "\n".join(lines))
  del compiled, state, params0, x


### Part 3: a planned chain


def part_planner(rep: Report, size, accel):
  S = remat.segmenters
  d, b, depth = size.chain_width, size.chain_batch, size.chain_depth
  layers = [lambda w, x: jnp.tanh(x @ w)] * depth
  ws = [jnp.eye(d, dtype=jnp.float32) * 0.9 + 0.001 * i for i in range(depth)]
  x = jnp.ones((b, d), jnp.float32)

  def step_of(apply):
    return jax.value_and_grad(lambda ws, x: jnp.sum(apply(ws, x) ** 2) / x.size, argnums=(0, 1))

  plain = remat.profile(step_of(lambda ws, x: functools.reduce(lambda h, w: jnp.tanh(h @ w), ws, x)), ws, x)
  budget = int(plain.temp_bytes * size.chain_budget)
  rep.row("planner", "plain", "temp", plain.temp_bytes, "bytes")
  lines = [f"Chain: {depth} layers `tanh(x @ w)`, batch {b}, width {d} (one activation "
           f"{fmt_bytes(b * d * 4)}); plain backprop compiles to {fmt_bytes(plain.temp_bytes)} of temp; "
           f"budget {fmt_bytes(budget)} ({size.chain_budget:.0%}).", "",
           "| planner | forward evals | offloaded | predicted temp | compiled temp | host temp | S(5) | fits "
           "| loss |", "|---|---|---|---|---|---|---|---|---|"]
  want = None
  runs = [("budget", S.budget(budget))]
  runs.append(("budget+offload", S.budget(budget, offload=remat.offload.host())))
  for name, seg in runs:
    try:
      apply = remat.sequential(layers, seg)
      plan = apply.plan_for(ws, x)
      step = remat.jit(step_of(apply))
      prof = remat.profile(step, ws, x)
      loss, _ = step(ws, x)
      loss = float(jax.block_until_ready(loss))
      want = loss if want is None else want
      fits = prof.temp_bytes <= seg.max_bytes
      pred, off = plan.predicted_peak_bytes, getattr(plan, "offloaded_bytes", 0) or 0
      s5 = len(re.findall(r"S\(5\)", prof.hlo))
      for metric, v in (("forward_evaluations", plan.forward_evaluations), ("predicted_temp", pred),
                        ("compiled_temp", prof.temp_bytes), ("host_temp", prof.host_temp_bytes),
                        ("offloaded_bytes", off), ("s5", s5), ("loss", loss)):
        rep.row("planner", name, metric, v)
      lines.append(f"| `{name}` | {plan.forward_evaluations} | {fmt_bytes(off)} | "
                   f"{fmt_bytes(pred) if pred else '-'} | {fmt_bytes(prof.temp_bytes)} | "
                   f"{fmt_bytes(prof.host_temp_bytes)} | {s5} | {'yes' if fits else 'no'} | {loss:.6g} |")
      rep.check(f"`remat.sequential({name})` compiles and runs on {jax.default_backend()}",
                math.isfinite(loss) and abs(loss - want) <= 1e-4 * max(abs(want), 1e-12),
                f"loss {loss:.6g}, compiled temp {fmt_bytes(prof.temp_bytes)} "
                f"(budget {fmt_bytes(seg.max_bytes)}, {'fits' if fits else 'over'})")
    except Exception as e:  # noqa: BLE001 - report, go on
      rep.check(f"`remat.sequential({name})` compiles and runs", False, f"{type(e).__name__}: {e}")
  if hasattr(remat, "fit"):
    try:
      # `remat.fit` bounds the whole step's peak (arguments, outputs, temp): the same temp cut.
      memory = int(plain.peak_bytes - (1 - size.chain_budget) * plain.temp_bytes)
      fitted = remat.fit(step_of(remat.sequential(layers, S.auto())), memory)
      report = fitted.plans(ws, x)
      loss = float(jax.block_until_ready(fitted(ws, x)[0]))
      prof, evals = report.profile, sum(p.forward_evaluations for p in report.plans)
      fits = prof.peak_bytes <= memory
      for metric, v in (("forward_evaluations", evals), ("compiled_temp", prof.temp_bytes),
                        ("peak", prof.peak_bytes), ("memory", memory), ("compiles", report.compiles),
                        ("loss", loss)):
        rep.row("planner", "fit", metric, v)
      rep.check(f"`remat.fit(step, {fmt_bytes(memory)})` with `segmenters.auto()` compiles and runs",
                math.isfinite(loss) and fits,
                f"loss {loss:.6g}, peak {fmt_bytes(prof.peak_bytes)} in {report.compiles} compiles")
      lines.append(f"| `remat.fit` + `auto()` | {evals} | - | - | {fmt_bytes(prof.temp_bytes)} | "
                   f"{fmt_bytes(prof.host_temp_bytes)} | - | {'yes' if fits else 'no'} | {loss:.6g} |")
    except Exception as e:  # noqa: BLE001
      rep.check("`remat.fit` with `segmenters.auto()` compiles and runs", False, f"{type(e).__name__}: {e}")
  else:
    rep.notes.append("`remat.fit` does not exist in this checkout; only `budget` plans were run.")
  rep.sections["A planned chain"] = "\n".join(lines)


### Part 4: the core tests


def part_tests(rep: Report, mode: str, seconds: float, out: Path):
  log = out / "tests.log"
  files = [f for f in CORE_TESTS if (ROOT / f).exists()]
  if mode == "skip" or not files:
    rep.check("core tests", True, skip_reason="not run (--tests skip)" if files else "no tests/ here")
    return
  if not _has("pytest"):
    rep.check("core tests", True, skip_reason="pytest is not installed")
    return
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=line", *files]
  if mode == "collect":
    cmd.append("--collect-only")
  elif _has("xdist"):
    cmd += ["-n", "4"]
  print(f"  $ {' '.join(cmd[1:])}   (at most {seconds:.0f} s)", flush=True)
  t0 = time.perf_counter()
  # Its own process group, so that pytest-xdist's workers stop with it at the time limit.
  # The tests import remat_bench (bench/): importable from the checkout even where pip failed.
  path = [str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  try:
    text, _ = proc.communicate(timeout=max(seconds, 10))
    timed_out = False
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    text, _ = proc.communicate()
    timed_out = True
  log.write_text(text)
  secs = time.perf_counter() - t0
  counts = {k: int(n) for n, k in re.findall(
      r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|tests? collected)", text)}
  if timed_out:  # count the progress characters of the lines written so far
    progress = "".join(ln.split(" [")[0] for ln in text.splitlines()
                       if re.fullmatch(r"[.FEsx]+( +\[.*\])?", ln))
    counts = {"passed": progress.count("."), "failed": progress.count("F"), "errors": progress.count("E"),
              "skipped": progress.count("s")}
  failures = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
  for k, v in counts.items():
    rep.row("tests", mode, k, v)
  rep.row("tests", mode, "seconds", secs, "s", "timed out" if timed_out else "")
  summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line (see tests.log)"
  if mode == "collect":
    n = counts.get("tests collected", counts.get("test collected", 0))
    rep.check("core tests collect under this jax/flax", n > 0 and proc.returncode == 0,
              f"{summary} in {secs:.0f} s")
  else:
    broken = counts.get("failed", 0) + counts.get("errors", 0) + counts.get("error", 0)
    rep.check("core tests pass", not broken and proc.returncode in (0, -signal.SIGKILL),
              f"{summary} in {secs:.0f} s" + (" (stopped at the time limit)" if timed_out else ""),
              incomplete=timed_out)
  rep.sections["Core tests"] = (f"`python -m pytest {' '.join(files)}`: {summary} in {secs:.0f} s"
                                f"{' (stopped at the time limit)' if timed_out else ''}.\n\n"
                                + "\n".join(f"- `{ln}`" for ln in failures[:40]))


def _has(module):
  try:
    importlib.import_module(module)
    return True
  except ImportError:
    return False


### Main


def write_outputs(rep: Report, out: Path, header: list[str]):
  with open(out / "gpu_check.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["part", "name", "metric", "value", "unit", "note"])
    w.writeheader()
    w.writerows(rep.rows)
  md = ["# remat GPU check", "", *header, "", "## Checks", "", "| status | check | detail |", "|---|---|---|"]
  md += [f"| {s} | {n} | {d} |" for s, n, d in rep.checks]
  for title, body in rep.sections.items():
    md += ["", f"## {title}", "", body]
  if rep.notes:
    md += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
  (out / "gpu_check.md").write_text("\n".join(md) + "\n")
  return "\n".join(md)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes; host-memory checks skipped on CPU")
  ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="folder for the CSV and summary")
  ap.add_argument("--budget-s", type=float, default=330.0,
                  help="whole-run time budget in seconds (the tests get what is left)")
  ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 10; smoke 2)")
  ap.add_argument("--tests", choices=("run", "collect", "skip"), default=None,
                  help="core tests: run them (default on GPU/TPU), only collect (default with --cpu-smoke)")
  ap.add_argument("--layers", type=int, default=None)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--seq", type=int, default=None)
  args = ap.parse_args(argv)
  t_start = time.perf_counter()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  backend = jax.default_backend()
  accel = backend in ("gpu", "tpu")
  smoke = args.cpu_smoke or not accel
  size = SMOKE if smoke else FULL
  size = dataclasses.replace(size, **{k: v for k, v in dict(layers=args.layers, batch=args.batch,
                                                            seq=args.seq).items() if v is not None})
  rounds = args.rounds or (2 if smoke else 10)
  tests = args.tests or ("collect" if smoke else "run")
  v = versions()
  dev = jax.devices()[0]
  header = [f"- versions: {', '.join(f'{k} {x}' for k, x in v.items())}",
            f"- backend `{backend}`, device `{dev.device_kind}` x{jax.device_count()}, "
            f"`remat.offload.supported()` = {remat.offload.supported()}",
            f"- mode: {'CPU smoke (tiny sizes)' if smoke else 'full'}; budget {args.budget_s:.0f} s"]
  print("\n".join(header), flush=True)
  rep = Report()
  for k, x in v.items():
    rep.row("env", k, "version", x)
  rep.row("env", "device", "kind", dev.device_kind, note=backend)
  if accel:
    rep.check(f"`remat.offload.supported()` on {backend}", remat.offload.supported(),
              f"memories: {sorted(m.kind for m in dev.addressable_memories())}")
  else:
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)

  for title, fn in (("offload, peers, step times", lambda: part_offload(rep, size, accel, rounds, backend)),
                    ("planned chain", lambda: part_planner(rep, size, accel))):
    print(f"\n== {title}", flush=True)
    t0 = time.perf_counter()
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - one broken part must not hide the others
      traceback.print_exc()
      rep.check(f"{title} ran", False, f"{type(e).__name__}: {e}")
    rep.row("env", title, "seconds", time.perf_counter() - t0, "s")
    gc.collect()
    jax.clear_caches()

  print("\n== core tests", flush=True)
  left = args.budget_s - (time.perf_counter() - t_start) - 15
  if tests == "run" and left < 30:
    rep.check("core tests", True, skip_reason=f"no time left ({left:.0f} s of the budget)")
  else:
    part_tests(rep, tests, left, out)

  total = time.perf_counter() - t_start
  header.append(f"- total {total:.0f} s")
  text = write_outputs(rep, out, header)
  print("\n" + text)
  failed = rep.failed()
  print(f"\nwrote {out / 'gpu_check.csv'}, {out / 'gpu_check.md'}"
        + (f", {out / 'tests.log'}" if (out / 'tests.log').exists() else ""))
  if failed:
    print(f"FAILED: {len(failed)} check(s)")
    return 1
  print("OK" + (" (CPU smoke: host-memory checks skipped)" if not accel else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
