"""The founding table, measured: memory and compute of every way to backpropagate.

``remat compare`` and ``experiments/tradeoff.py`` both run :func:`main`. Each
method's training step (loss and gradients of a reference chain) is compiled
with ``remat.compiler_options()`` and measured: compiled temp/peak bytes,
flops, forward layer evaluations counted in the optimized HLO, and the median
step time of interleaved runs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import platform
import statistics
import time
import warnings
from typing import Callable, Sequence

import jax

import remat
from remat import segmenters as seg_lib
from remat._src.cli.cli_util import (OneLineParser, make_progress, markdown_table, nearest_divisor,
                                     positive_int)
from remat._src.util.units import format_bytes
from remat_bench import chains

__all__ = ["METHODS", "STYLES", "check_claims", "environment", "figures", "founding_table",
           "interleaved_medians", "make_progress", "markdown_table", "measure", "main", "plot", "run",
           "step_for"]

METHODS = ("standard", "forward_only", "no_storage", "checkpoint_sqrt", "multilevel", "revolve",
           "budget", "offload")

DESCRIPTIONS = {
    "standard": "plain backprop: every activation stored",
    "forward_only": "inference: no backward pass, buffers reused",
    "no_storage": "store only the chain input; recompute each layer's input from it",
    "checkpoint_sqrt": "sqrt(D) segments: keep segment inputs, recompute inside",
    "multilevel": "two nested levels of segments: O(D^(1/3)) stored states",
    "revolve": "Griewank-Walther optimum for a few stored states",
    "budget": "the planner, given checkpoint_sqrt's compiled memory as its budget",
    "offload": "no matmul recomputed; saved matmul outputs and layer inputs placed in host memory",
}

COLUMNS = ["method", "depth", "peak_bytes", "temp_bytes", "host_temp_bytes", "flops",
           "forward_evaluations", "step_time_s", "backend", "device_kind"]


def environment() -> dict[str, str]:
  """Backend and device kind, recorded in every results file."""
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": getattr(d, "device_kind", str(d)),
          "device_count": str(jax.device_count()), "jax": jax.__version__,
          "python": platform.python_version()}


def interleaved_medians(fns: dict[str, Callable[[], object]], *, rounds: int = 10,
                        warmup: int = 1) -> dict[str, float]:
  """Median wall time (seconds) of each thunk, run round-robin so noise hits all alike."""
  for _ in range(warmup):
    for f in fns.values():
      jax.block_until_ready(f())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def segmenter_for(method: str, chain: chains.Chain, *, revolve_slots: int = 3):
  """The segmenter of a planned method (``None`` for the others)."""
  if method == "budget":
    sqrt_plan = remat.sequential(chain.layers, seg_lib.sqrt()).plan_for(*chain.specs(), compile=True)
    return seg_lib.budget(sqrt_plan.compiled_temp_bytes)
  return {"no_storage": seg_lib.none(), "checkpoint_sqrt": seg_lib.sqrt(),
          "multilevel": seg_lib.multilevel(2), "revolve": seg_lib.revolve(revolve_slots)}.get(method)


def step_for(method: str, chain: chains.Chain, *, revolve_slots: int = 3):
  """``(step(params, x, key), plan or None)``: one training step (or a forward) of ``method``."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
  run = chain.chain_fn()
  plan = None
  if method == "offload":
    ck = remat.checkpoint(chain.layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                          offload=remat.offload.host(argnums=1, min_bytes=0))
    run = _per_layer(ck)
  elif method not in ("standard", "forward_only"):
    apply = remat.sequential(chain.layers, segmenter_for(method, chain, revolve_slots=revolve_slots))
    plan = apply.plan_for(*chain.specs())
    run = apply
  if method == "forward_only":
    return (lambda ps, x, key: chains.mean_square(run(ps, x, key))), plan
  return jax.value_and_grad(lambda ps, x, key: chains.mean_square(run(ps, x, key))), plan


def _per_layer(f):
  def run(params, x, key=None):
    for i, p in enumerate(params):
      x = chains.call_layer(f, p, x, key, i)
    return x
  return run


def measure(chains_: Sequence[chains.Chain], methods: Sequence[str], *, rounds: int = 5,
            revolve_slots: int = 3, progress: bool = True, log=print) -> list[dict]:
  """Measures every method on every chain; returns one row (a dict of COLUMNS) each."""
  env = environment()
  rows: list[dict] = []
  miscounted: list[str] = []
  # One step per method and chain, and one for timing each chain.
  bar = make_progress(len(chains_) * (len(methods) + (1 if rounds > 0 else 0)), progress)
  with warnings.catch_warnings():
    # XLA:CPU writes host placements into the program but moves nothing; the
    # backend is recorded in every row.
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    for chain in chains_:
      params, x, key = chain.init()
      compiled, per_layer = {}, None
      chain_rows = []
      for method in methods:
        bar.set_description(f"D={chain.depth} {method}")
        step, plan = step_for(method, chain, revolve_slots=revolve_slots)
        # One compile serves both the statistics and the timed runs.
        fn = remat.jit(step).lower(params, x, key).compile()
        prof = remat.Profile.from_compiled(fn)
        dots = prof.forward_dots()
        if per_layer is None:  # forward matmuls of one layer
          one = dataclasses.replace(chain, depth=1)
          ref_step, _ = step_for("forward_only", one)
          per_layer = max(1, remat.profile(ref_step, *one.init()).forward_dots())
        fwd = round(dots / per_layer)
        if plan is not None and fwd != plan.forward_evaluations:
          miscounted.append(f"{method} at D={chain.depth}: {fwd} of {plan.forward_evaluations}")
        compiled[method] = fn
        chain_rows.append(dict(method=method, depth=chain.depth, peak_bytes=prof.peak_bytes,
                               temp_bytes=prof.temp_bytes, host_temp_bytes=prof.host_temp_bytes,
                               flops=prof.flops, forward_evaluations=fwd, step_time_s=float("nan"),
                               backend=env["backend"], device_kind=env["device_kind"]))
        bar.update(1)
      if rounds > 0:
        bar.set_description(f"D={chain.depth} timing")
        args_ = (params, x, key)
        times = interleaved_medians({m: (lambda f=f, a=args_: f(*a)) for m, f in compiled.items()},
                                    rounds=rounds)
        for r in chain_rows:
          r["step_time_s"] = times[r["method"]]
        bar.update(1)
      rows += chain_rows
  bar.close()
  if miscounted:
    log("note: the compiled HLO holds other layer forward evaluation counts than the plans ("
        + "; ".join(miscounted) + "). Evaluations are counted as forward matmuls; XLA drops a "
        "recomputed matmul whose output nothing needs (the last linear layer of a block at the end of "
        "a recomputation), so on such blocks the count comes out low.")
  return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({c: r[c] for c in COLUMNS})


def read_csv(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for r in csv.DictReader(f):
      for k in ("depth", "peak_bytes", "temp_bytes", "host_temp_bytes", "forward_evaluations"):
        r[k] = int(r[k])
      for k in ("flops", "step_time_s"):
        r[k] = float(r[k])
      out.append(r)
  return out


def founding_table(rows: Sequence[dict], activation_bytes: int) -> str:
  """The founding notes' table with measured numbers at the largest depth."""
  dmax = max(r["depth"] for r in rows)
  at = {r["method"]: r for r in rows if r["depth"] == dmax}
  std = at.get("standard")
  body = []
  for m in METHODS:
    if m not in at:
      continue
    r = at[m]
    rel = lambda k, r=r: f"{r[k] / std[k]:.2f}x" if std and std[k] and math.isfinite(r[k] / std[k]) else "n/a"
    body.append([m, f"{r['temp_bytes'] / activation_bytes:.1f} act ({format_bytes(r['temp_bytes'])})",
                 rel("flops"), r["forward_evaluations"], rel("step_time_s")])
  head = ["method", "memory (compiled temp)", "compute (flops vs standard)",
          "layer forward evaluations", "step time vs standard"]
  return (f"depth {dmax}, one activation = {format_bytes(activation_bytes)}, measured on "
          f"{rows[0]['backend']} ({rows[0]['device_kind']}):\n\n" + markdown_table(head, body))


def check_claims(rows: Sequence[dict], activation_bytes: int) -> list[tuple[str, bool]]:
  """The founding notes' claims, checked against the measurements (never tuned to them).

  Each claim prints the numbers it rests on, and the slack it allows: where a layer's working set
  dwarfs its activation (transformer blocks), methods that store one or three boundaries compile
  to about the same temp memory, so "least memory" allows one taped layer's memory (the growth of
  standard per layer) and "between" one activation (``activation_bytes``). Claims are made for
  chains of at least 4 layers (below that the methods coincide), and the one about growth with
  depth only for a sweep of two depths or more.
  """
  dmax, dmin = max(r["depth"] for r in rows), min(r["depth"] for r in rows)
  if dmax < 4:
    return []
  act = activation_bytes

  def at(m, d=dmax):
    return next((r for r in rows if r["method"] == m and r["depth"] == d), None)

  def acts(b):
    return f"{b / act:.1f} activations ({format_bytes(b)})"

  claims = []
  std, nos, sq = at("standard"), at("no_storage"), at("checkpoint_sqrt")
  if std and nos:
    others = sorted((r["temp_bytes"], r["method"]) for r in rows if r["depth"] == dmax
                    and r["method"] not in ("no_storage", "forward_only", "offload"))
    low, low_m = others[0]
    # Tolerance: one taped layer's memory (standard's growth per layer; one activation for tanh
    # layers, far more for a transformer block), which XLA may schedule differently from one
    # method to the next.
    std_lo = at("standard", dmin)
    layer = max(act, (std["temp_bytes"] - std_lo["temp_bytes"]) / (dmax - dmin)) if dmax > dmin else act
    claims.append((f"no_storage uses the least memory of the methods with a backward pass at D={dmax}, "
                   f"to within one taped layer ({layer / act:.1f} activations): {acts(nos['temp_bytes'])}; "
                   f"the least of the others: {low_m}, {acts(low)}", nos["temp_bytes"] <= low + layer))
    expect = lambda d: ((d + 1) / 2 + 2) / 3  # noqa: E731 - D(D+1)/2 forwards + 2D, over 3D
    ratio = nos["flops"] / std["flops"]
    text = (f"no_storage pays quadratic compute: D(D+1)/2 = {dmax * (dmax + 1) // 2} layer forward "
            f"evaluations at D={dmax}, {ratio:.2f}x the flops of standard (about {expect(dmax):.2f}x "
            "where a backward costs two forwards)")
    ok = ratio >= 0.8 * expect(dmax)
    nos_lo, std_lo = at("no_storage", dmin), at("standard", dmin)
    if nos_lo and std_lo and dmin < dmax:
      ratio_lo = nos_lo["flops"] / std_lo["flops"]
      text += f", up from {ratio_lo:.2f}x at D={dmin}"
      ok = ok and ratio > ratio_lo
    claims.append((text, ok))
  if std and nos and sq:
    claims.append((f"checkpoint_sqrt memory lies between no_storage and standard at D={dmax}: "
                   f"{acts(nos['temp_bytes'])} <= {acts(sq['temp_bytes'])} < {acts(std['temp_bytes'])}",
                   nos["temp_bytes"] <= sq["temp_bytes"] + act and sq["temp_bytes"] < std["temp_bytes"]))
    claims.append((f"checkpoint_sqrt costs about one extra forward pass: {sq['flops'] / std['flops']:.2f}x "
                   "the flops of standard (under 1.5x; 4/3 where a backward costs two forwards)",
                   sq["flops"] < 1.5 * std["flops"]))
  fo_hi, fo_lo, std_lo = at("forward_only"), at("forward_only", dmin), at("standard", dmin)
  if fo_hi and fo_lo and std and std_lo and dmax > dmin:
    grow = (fo_hi["temp_bytes"] - fo_lo["temp_bytes"]) / act
    per_layer = (std["temp_bytes"] - std_lo["temp_bytes"]) / act / (dmax - dmin)
    claims.append((f"forward_only memory stays flat from D={dmin} to D={dmax} (within two activations): "
                   f"{fo_lo['temp_bytes'] / act:.1f} -> {fo_hi['temp_bytes'] / act:.1f} activations "
                   f"({grow:+.1f}), while standard grows by {per_layer:.1f} activations per layer "
                   f"({std_lo['temp_bytes'] / act:.1f} -> {std['temp_bytes'] / act:.1f})",
                   abs(grow) <= 2 and per_layer >= 0.5))
  return claims


def plot(rows: Sequence[dict], out_dir: str, activation_bytes: int) -> list[str]:
  """memory_vs_depth.png, compute_vs_depth.png and frontier.png in ``out_dir``."""
  import matplotlib

  if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  for fig in figures(rows, activation_bytes):
    name = fig.get_label()
    paths.append(os.path.join(out_dir, name))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


# One colour and marker per method, the same in every plot.
STYLES = {
    "standard": ("#000000", "o"),
    "forward_only": ("#7f7f7f", "s"),
    "no_storage": ("#d62728", "v"),
    "checkpoint_sqrt": ("#1f77b4", "^"),
    "multilevel": ("#9467bd", "D"),
    "revolve": ("#ff7f0e", "P"),
    "budget": ("#2ca02c", "*"),
    "offload": ("#8c564b", "X"),
}


def figures(rows: Sequence[dict], activation_bytes: int) -> list:
  """The three figures (matplotlib ``Figure`` objects) of a sweep.

  Every method keeps its colour and marker (:data:`STYLES`) in all three, and legends sit beside
  the axes; the frontier names its points in a legend that carries each point's numbers, so that
  points which coincide stay distinguishable and no label overlaps another.
  """
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter, NullFormatter

  methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
  std = {r["depth"]: r for r in rows if r["method"] == "standard"}
  act_label = f"activations of {format_bytes(activation_bytes)}"
  depths = sorted({r["depth"] for r in rows})
  dmax = depths[-1]
  backend = rows[0].get("backend", "")
  on = f" ({backend})" if backend else ""
  times = FuncFormatter(lambda v, _: f"{v:g}x")
  # Minor ticks of a log axis: label 2, 3 and 5 (x 10^k) only, so labels never crowd.
  some_times = FuncFormatter(
      lambda v, _: f"{v:g}x" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else "")
  figs = []
  for key, ylabel, title, fname in [
      ("temp_bytes", f"compiled temp memory ({act_label})",
       "Memory of one training step vs depth", "memory_vs_depth.png"),
      ("flops", "flops / standard's at the same depth (x)",
       "Compute of one training step vs depth", "compute_vs_depth.png")]:
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    fig.set_label(fname)
    for m in methods:
      rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["depth"])
      if key == "flops":
        rs = [r for r in rs if r["depth"] in std]
        ys = [r["flops"] / std[r["depth"]]["flops"] for r in rs]
      else:
        ys = [r[key] / activation_bytes for r in rs]
      color, marker = STYLES[m]
      ax.plot([r["depth"] for r in rs], ys, marker=marker, color=color, label=m,
              markersize=9 if marker == "*" else 6)
    ax.set_xlabel("depth D (layers)")
    ax.set_ylabel(ylabel)
    ax.set_title(title + on)
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if key == "flops":
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(times)
      ax.yaxis.set_minor_formatter(some_times)
    else:  # symlog: forward-only memory can be 0 activations
      ax.set_yscale("symlog", linthresh=1)
      ax.set_ylim(bottom=0)
      ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    figs.append(fig)
  fig, ax = plt.subplots(figsize=(7.6, 4.4))
  fig.set_label("frontier.png")
  if dmax in std:
    at_max = [r for m in methods for r in rows
              if r["method"] == m and r["depth"] == dmax and m != "forward_only"]
    for r in at_max:
      mem, cost = r["temp_bytes"] / activation_bytes, r["flops"] / std[dmax]["flops"]
      color, marker = STYLES[r["method"]]
      # The large star lies under the other markers, so that a point it coincides with stays visible.
      ax.scatter(mem, cost, color=color, marker=marker, s=150 if marker == "*" else 70, alpha=0.85,
                 edgecolors="white", linewidths=0.5, zorder=2 if marker == "*" else 3,
                 label=f"{r['method']}: {mem:.1f} act, {cost:.2f}x")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), title=f"D={dmax}",
              title_fontsize=8)
  ax.set_xlabel(f"compiled temp memory at D={dmax} ({act_label})")
  ax.set_ylabel("flops / standard's (x)")
  ax.yaxis.set_major_formatter(times)
  ax.set_title(f"The memory / compute trade-off at D={dmax}{on}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  figs.append(fig)
  return figs


### The command (``remat compare`` and ``experiments/tradeoff.py``)


def add_arguments(ap: argparse.ArgumentParser) -> None:
  """The options of ``remat compare`` / ``experiments/tradeoff.py``."""
  ap.add_argument("--quick", action="store_true", help="small sweep (about a minute on 2 CPU cores)")
  ap.add_argument("--out", default=None, help="directory for tradeoff.csv and the plots (default: none)")
  ap.add_argument("--model", choices=chains.MODELS, default="mlp",
                  help="reference chain: tanh(x @ w) layers or transformer blocks (default: mlp)")
  ap.add_argument("--depths", type=positive_int("--depths", "4 8 16"), nargs="+",
                  help="default 4 8 16 32 (quick) or 4 8 16 32 64")
  ap.add_argument("--batch", type=positive_int("--batch", "512"), default=None,
                  help="default 512 (mlp) or 8 (transformer)")
  ap.add_argument("--width", type=positive_int("--width", "256"), default=256,
                  help="features per layer (default 256)")
  ap.add_argument("--seq-len", type=positive_int("--seq-len", "128"), default=128,
                  help="sequence length, transformer (default 128)")
  ap.add_argument("--heads", type=positive_int("--heads", "4"), default=4,
                  help="attention heads, transformer (default 4; must divide --width)")
  ap.add_argument("--rounds", type=positive_int("--rounds", "3", zero=True), default=None,
                  help="timed rounds per method, median reported (default 3 quick, 7 full); 0 skips timing")
  ap.add_argument("--revolve-slots", type=positive_int("--revolve-slots", "3"), default=3,
                  help="stored states of revolve (default 3)")
  ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                  help="subset of methods (default all; standard is always measured)")
  ap.add_argument("--no-progress", action="store_true", help="plain lines instead of a progress bar")


def run(args: argparse.Namespace) -> list[dict]:
  """Measures the sweep ``args`` describes; prints the table and claims; writes CSV and plots."""
  depths = args.depths or ([4, 8, 16, 32] if args.quick else [4, 8, 16, 32, 64])
  rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
  batch = args.batch or (512 if args.model == "mlp" else 8)
  methods = list(dict.fromkeys(["standard"] + list(args.methods)))
  sweep = [chains.Chain(model=args.model, depth=d, width=args.width, batch=batch, seq_len=args.seq_len,
                        heads=args.heads) for d in depths]
  rows = measure(sweep, methods, rounds=rounds, revolve_slots=args.revolve_slots,
                 progress=not args.no_progress)
  print("\nThe founding table, " + founding_table(rows, sweep[0].activation_bytes))
  claims = check_claims(rows, sweep[0].activation_bytes)
  if not claims:
    print("\nThe founding notes' claims are about chains of 4 layers or more; not checked here.")
  if claims:
    print("\nClaims of the founding notes, checked against these measurements:")
    for text, ok in claims:
      print(f"  [{'holds' if ok else 'DOES NOT HOLD'}] {text}")
  if rows[0]["backend"] == "cpu" and "offload" in methods:
    print("\nNote: XLA:CPU does not execute host offload (remat.offload.supported() is False), so the "
          "offload row keeps its values in device memory here; on a GPU/TPU they move to host "
          "(host_temp_bytes).")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "tradeoff.csv")
    write_csv(rows, csv_path)
    paths = plot(rows, args.out, sweep[0].activation_bytes)
    print(f"\nwrote {csv_path}, {', '.join(paths)}")
  return rows


def main(argv=None, prog: str | None = None) -> int:
  """Runs the command; a bad option prints one line and exits with status 2."""
  ap = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
  add_arguments(ap)
  args = ap.parse_args(argv)
  if args.model == "transformer" and args.width % args.heads:
    ap.error(f"argument --heads: {args.heads} does not divide --width {args.width} (each head gets "
             f"width / heads features); use a divisor such as --heads "
             f"{nearest_divisor(args.width, args.heads)}.")
  run(args)
  return 0
