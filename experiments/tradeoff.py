"""The founding table, measured: memory and compute of every way to backpropagate.

For a sweep of depths of a `tanh(x @ w)` chain, each method's training step
(loss and gradients) is compiled with `remat.jit`'s options and measured:

  standard         plain backprop: every activation stored
  forward_only     inference: no backward pass, no residuals (buffer reuse)
  no_storage       store nothing: recompute from the chain input for every layer
  checkpoint_sqrt  sqrt(D) segments: store segment inputs, recompute inside
  multilevel       two nested levels: O(D^(1/3)) stored states
  revolve          Griewank-Walther optimum with a few slots
  budget           the planner, given sqrt's measured memory as its budget
  offload          no matmul recomputed: every pre-activation saved and placed in host
                   memory (moves only where the backend executes memory kinds: GPU/TPU)

Writes `tradeoff.csv` (method, depth, peak_bytes, temp_bytes, host_temp_bytes,
flops, forward_evaluations, step_time_s, backend, device_kind) and PNG plots to
`--out`, prints the founding table with measured numbers, and checks the notes'
claims (reported, never tuned).

    python experiments/tradeoff.py --quick --out results
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import warnings

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import remat  # noqa: E402
from remat import segmenters as S  # noqa: E402

METHODS = ("standard", "forward_only", "no_storage", "checkpoint_sqrt", "multilevel", "revolve",
           "budget", "offload")


def layer(w, x):
  return jnp.tanh(x @ w)


def chain(ws, x):
  for w in ws:
    x = layer(w, x)
  return x


def loss_of(y):
  return jnp.mean(y ** 2)


def steps_for(method: str, depth: int, ws_spec, x_spec, revolve_slots: int):
  """(step function, predicted forward evaluations or None) for one method."""
  layers = [layer] * depth
  grad = lambda f: jax.value_and_grad(lambda ws, x: loss_of(f(ws, x)))
  if method == "standard":
    return grad(chain), depth
  if method == "forward_only":
    return (lambda ws, x: loss_of(chain(ws, x))), depth
  if method == "offload":
    # No matmul is recomputed: every layer's pre-activation `x @ w` is saved (by
    # name) and placed in host memory; the backward pass recomputes only the
    # elementwise tanh from it. The parameters (argument 0) stay on device.
    def named_chain(ws, x):
      for w in ws:
        x = jnp.tanh(checkpoint_name(x @ w, "pre"))
      return x

    ck = remat.checkpoint(named_chain, policy=jax.checkpoint_policies.save_only_these_names("pre"),
                          offload=remat.offload.host(argnums=1, min_bytes=0))
    return grad(ck), depth
  seg = {
      "no_storage": S.none(),
      "checkpoint_sqrt": S.sqrt(),
      "multilevel": S.multilevel(2),
      "revolve": S.revolve(revolve_slots),
  }.get(method)
  if method == "budget":
    sqrt_plan = S.plan_for(layers, S.sqrt(), ws_spec, x_spec, compile=True)
    seg = S.budget(sqrt_plan.compiled_temp_bytes)
  apply = remat.sequential(layers, seg)
  plan = apply.plan_for(ws_spec, x_spec)
  return grad(lambda ws, x: apply(ws, x)), plan.forward_evaluations


def measure(depths, methods, *, batch, width, rounds, revolve_slots, progress=True):
  rows = []
  env = _common.environment()
  todo = [(d, m) for d in depths for m in methods]
  bar = _progress(len(todo), progress)
  for depth in depths:
    ws = [jax.random.normal(jax.random.key(i), (width, width)) / math.sqrt(width) for i in range(depth)]
    x = jax.random.normal(jax.random.key(depth), (batch, width))
    ws_spec = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in ws]
    x_spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    compiled = {}
    for method in methods:
      bar.set_description(f"depth {depth:3d} {method}")
      step, predicted = steps_for(method, depth, ws_spec, x_spec, revolve_slots)
      fn = remat.jit(step)
      prof = remat.profile(fn, ws, x)
      fwd = prof.count_dots(lhs_contracting=(1,), rhs_contracting=(0,))
      if predicted is not None and fwd != predicted:
        print(f"  note: {method} at depth {depth}: compiled HLO holds {fwd} forward matmuls, "
              f"the plan predicted {predicted}")
      compiled[method] = fn
      rows.append(dict(method=method, depth=depth, peak_bytes=prof.peak_bytes,
                       temp_bytes=prof.temp_bytes, host_temp_bytes=prof.host_temp_bytes,
                       flops=prof.flops, forward_evaluations=fwd, step_time_s=None, **{
                           "backend": env["backend"], "device_kind": env["device_kind"]}))
      bar.update(1)
    times = _common.interleaved_medians({m: (lambda f=f: f(ws, x)) for m, f in compiled.items()},
                                        rounds=rounds, warmup=1)
    for r in rows:
      if r["depth"] == depth:
        r["step_time_s"] = times[r["method"]]
  bar.close()
  return rows


class _NoBar:
  def __init__(self, total):
    self.n, self.total = 0, total

  def set_description(self, s):
    print(f"[{self.n + 1}/{self.total}] {s}", flush=True)

  def update(self, k):
    self.n += k

  def close(self):
    pass


def _progress(total, enabled):
  if not enabled:
    return _NoBar(total)
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return _NoBar(total)
  return tqdm(total=total, unit="compile", leave=True)


def write_csv(rows, path):
  cols = ["method", "depth", "peak_bytes", "temp_bytes", "host_temp_bytes", "flops",
          "forward_evaluations", "step_time_s", "backend", "device_kind"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in rows:
      w.writerow({c: r[c] for c in cols})


def plot(rows, out_dir, batch, width) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  act = batch * width * 4
  methods = list(dict.fromkeys(r["method"] for r in rows))
  paths = []
  for key, ylabel, fname in [("temp_bytes", "compiled temp memory (activations)", "memory_vs_depth.png"),
                             ("flops", "flops / standard at same depth", "compute_vs_depth.png")]:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods:
      rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["depth"])
      if key == "flops":
        std = {r["depth"]: r["flops"] for r in rows if r["method"] == "standard"}
        ys = [r["flops"] / std[r["depth"]] for r in rs]
      else:
        ys = [r[key] / act for r in rs]
      ax.plot([r["depth"] for r in rs], ys, marker="o", label=m)
    ax.set_xlabel("depth D (layers)")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    if key == "temp_bytes":
      ax.set_yscale("symlog", linthresh=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, fname))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  dmax = max(r["depth"] for r in rows)
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  std = next(r for r in rows if r["method"] == "standard" and r["depth"] == dmax)
  for r in rows:
    if r["depth"] == dmax and r["method"] != "forward_only":
      ax.scatter(r["temp_bytes"] / act, r["flops"] / std["flops"])
      ax.annotate(r["method"], (r["temp_bytes"] / act, r["flops"] / std["flops"]), fontsize=8)
  ax.set_xlabel(f"compiled temp memory at D={dmax} (activations)")
  ax.set_ylabel("flops / standard")
  ax.set_title("memory / compute frontier")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "frontier.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths


def founding_table(rows, batch, width) -> str:
  dmax = max(r["depth"] for r in rows)
  act = batch * width * 4
  at = {r["method"]: r for r in rows if r["depth"] == dmax}
  std = at["standard"]
  body = []
  for m in METHODS:
    if m not in at:
      continue
    r = at[m]
    body.append([m, f"{r['temp_bytes'] / act:.1f} act ({_common.mib(r['temp_bytes'])})",
                 f"{r['flops'] / std['flops']:.2f}x", r["forward_evaluations"],
                 f"{r['step_time_s'] / std['step_time_s']:.2f}x"])
  print(f"\nThe founding table at depth {dmax} (batch {batch}, width {width}; one activation = "
        f"{_common.mib(act)}), measured on {std['backend']} ({std['device_kind']}):\n")
  return _common.print_table(["method", "memory (compiled temp)", "compute (flops vs standard)",
                              "layer forward evaluations", "step time vs standard"], body)


def check_claims(rows) -> list[tuple[str, bool]]:
  dmax, dmin = max(r["depth"] for r in rows), min(r["depth"] for r in rows)
  at = lambda m, d=dmax: next((r for r in rows if r["method"] == m and r["depth"] == d), None)
  claims = []
  std, nos, sq = at("standard"), at("no_storage"), at("checkpoint_sqrt")
  fo_hi, fo_lo, std_lo = at("forward_only"), at("forward_only", dmin), at("standard", dmin)
  if std and nos:
    others = [r["temp_bytes"] for r in rows if r["depth"] == dmax
              and r["method"] not in ("no_storage", "forward_only", "offload")]
    claims.append((f"no_storage uses the least memory of the backward methods at D={dmax}",
                   nos["temp_bytes"] <= min(others)))
    claims.append((f"no_storage costs >= 3x the flops of standard at D={dmax} "
                   f"({nos['flops'] / std['flops']:.2f}x)", nos["flops"] >= 3 * std["flops"]))
  if std and nos and sq:
    claims.append((f"checkpoint_sqrt memory lies between no_storage and standard at D={dmax}",
                   nos["temp_bytes"] <= sq["temp_bytes"] < std["temp_bytes"]))
    claims.append((f"checkpoint_sqrt costs < 1.5x the flops of standard "
                   f"({sq['flops'] / std['flops']:.2f}x)", sq["flops"] < 1.5 * std["flops"]))
  if fo_hi and fo_lo and std and std_lo:
    claims.append((f"forward_only memory stays flat from D={dmin} to D={dmax} "
                   f"({fo_lo['temp_bytes']} -> {fo_hi['temp_bytes']} B)",
                   fo_hi["temp_bytes"] <= max(fo_lo["temp_bytes"], 1) * 1.01 + 1))
    claims.append((f"standard memory grows with depth ({std_lo['temp_bytes']} -> {std['temp_bytes']} B)",
                   std["temp_bytes"] > 2 * std_lo["temp_bytes"]))
  print("\nClaims of the founding notes, checked against these measurements:")
  for text, ok in claims:
    print(f"  [{'holds' if ok else 'DOES NOT HOLD'}] {text}")
  return claims


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="small sweep (under 5 minutes on 2 CPU cores)")
  ap.add_argument("--out", default="results", help="directory for tradeoff.csv and plots")
  ap.add_argument("--depths", type=int, nargs="+", help="depths to sweep (default 4 8 16 32 [64])")
  ap.add_argument("--batch", type=int, default=512)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=None, help="timed rounds per method (median)")
  ap.add_argument("--revolve-slots", type=int, default=3)
  ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)

  depths = args.depths or ([4, 8, 16, 32] if args.quick else [4, 8, 16, 32, 64])
  rounds = args.rounds or (3 if args.quick else 7)
  os.makedirs(args.out, exist_ok=True)
  with warnings.catch_warnings():
    # On XLA:CPU host placements are accepted but nothing moves; the backend is recorded.
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    rows = measure(depths, args.methods, batch=args.batch, width=args.width, rounds=rounds,
                   revolve_slots=args.revolve_slots, progress=not args.no_progress)
  csv_path = os.path.join(args.out, "tradeoff.csv")
  write_csv(rows, csv_path)
  paths = plot(rows, args.out, args.batch, args.width)
  founding_table(rows, args.batch, args.width)
  check_claims(rows)
  if rows[0]["backend"] == "cpu" and "offload" in args.methods:
    print("\nNote: XLA:CPU does not execute host offload (remat.offload.supported() is False): the "
          "offload row shows device-resident numbers here; run on a GPU/TPU to see host_temp_bytes.")
  print(f"\nwrote {csv_path} and {', '.join(paths)}")
  return rows


if __name__ == "__main__":
  main()
