"""Hand-picked remat policies (MaxText's presets) against the planner's per-block choices.

A Llama-style decoder (``remat_bench.models.llama``: RMSNorm, rotary embeddings, causal
attention, SwiGLU; tensors tagged with MaxText's ``checkpoint_name`` s), 8 blocks of width 512,
at sequence lengths 1024 and 4096 (batch 1). For each preset (``none``: no remat; ``full``;
``minimal``; ``save_qkv_proj``; ``save_dot_except_mlp``; ``save_dot_with_context_except_mlp``;
``save_out_proj``; ``minimal_with_context``; ``save_dot_except_mlpwi``) every block runs under
``jax.checkpoint(block, policy=preset)``, and the chain's training step is compiled: temp memory
and flops. Then ``remat.segmenters.budget`` plans the same chain at each preset's memory and
between neighbouring presets, choosing per block among its measured menu (matmul outputs,
subsets of the block's tags) jointly with segments. Checked, as measured:

* at every preset's memory the plan compiles under it with no more flops;
* between presets it needs strictly fewer flops than the best preset that fits;
* at length 4096 it finds selective recomputation by itself: at a third of plain's memory, at
  most 1.10x plain's flops.

Also times the planning of a 24-block chain. Writes policies.csv and policies.png to --out.

    python experiments/policies.py --out results
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import jax
import jax.numpy as jnp

import remat
from remat import segmenters as S
from remat_bench.models import llama
from remat_bench.models.llama.linen import DecoderBlock

PRESETS = ("none", "minimal_with_context", "minimal", "save_dot_with_context_except_mlp",
           "save_dot_except_mlpwi", "save_dot_except_mlp", "save_qkv_proj", "save_out_proj", "full")
WIDTH, HEADS, DEPTH, BATCH = 512, 8, 8, 1


def chain(length: int, depth: int = DEPTH):
  block = DecoderBlock(WIDTH, HEADS)
  layer = lambda p, x: block.apply(p, x)  # noqa: E731
  layer.__name__ = f"llama_block_{WIDTH}"
  p = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.ones((1, 8, WIDTH))))
  return [layer] * depth, [p] * depth, jax.ShapeDtypeStruct((BATCH, length, WIDTH), jnp.float32)


def step(layers, run):
  def s(ps, x):
    loss, (gp, gx) = jax.value_and_grad(lambda ps, x: run(ps, x).sum(), argnums=(0, 1))(ps, x)
    return loss, gp, gx.sum()
  return s


def preset_profile(name, layers, ps, x) -> remat.Profile:
  policy = llama.presets()[name]
  f = layers[0] if name == "none" else jax.checkpoint(layers[0], policy=policy)

  def run(ps, x):
    for p in ps:
      x = f(p, x)
    return x
  return remat.profile(step(layers, run), ps, x)


def planned(layers, ps, x, memory: int):
  apply = remat.sequential(layers, S.budget(memory))
  plan = apply.plan_for(ps, x)
  prof = remat.profile(step(layers, apply), ps, x)
  return plan, prof


def describe(plan) -> str:
  parts = []
  for seg in plan.root.children or (plan.root,):
    what = "ck" if seg.checkpoint else (seg.policy or "tape")
    parts.append(f"[{seg.start},{seg.stop}) {what}")
  return "; ".join(parts)


def measure(length: int, log=print) -> list[dict]:
  layers, ps, x = chain(length)
  act = BATCH * length * WIDTH * 4
  rows = []
  presets = {}
  for name in PRESETS:
    prof = preset_profile(name, layers, ps, x)
    presets[name] = prof
    rows.append(dict(length=length, kind="preset", name=name, memory_bytes=prof.temp_bytes,
                     temp_bytes=prof.temp_bytes, flops=prof.flops, plan=""))
    log(f"  T={length} preset {name}: temp {prof.temp_bytes / act:.1f} act, {prof.flops / 1e9:.1f} GFLOP")
  plain = presets["none"]
  by_memory = sorted(presets.items(), key=lambda kv: kv[1].temp_bytes)
  targets = [(f"at {n}", p.temp_bytes) for n, p in by_memory]
  targets += [(f"between {a} and {b}", (pa.temp_bytes + pb.temp_bytes) // 2)
              for (a, pa), (b, pb) in zip(by_memory, by_memory[1:], strict=False)
              if pb.temp_bytes > pa.temp_bytes]
  targets.append(("a third of plain", plain.temp_bytes // 3))
  for label, memory in targets:
    t = time.time()
    try:
      plan, prof = planned(layers, ps, x, memory)
    except ValueError as e:
      rows.append(dict(length=length, kind="planner", name=label, memory_bytes=memory, temp_bytes=0,
                       flops=float("nan"), plan=f"infeasible: {str(e)[:120]}"))
      log(f"  T={length} planner {label}: infeasible")
      continue
    fitting = [p.flops for p in presets.values() if p.temp_bytes <= memory]
    rows.append(dict(length=length, kind="planner", name=label, memory_bytes=memory,
                     temp_bytes=prof.temp_bytes, flops=prof.flops, plan=describe(plan),
                     best_preset_flops=min(fitting) if fitting else "",
                     seconds=round(time.time() - t, 1)))
    log(f"  T={length} planner {label}: temp {prof.temp_bytes / act:.1f} act (memory {memory / act:.1f}), "
        f"{prof.flops / 1e9:.1f} GFLOP; best preset that fits "
        f"{min(fitting) / 1e9 if fitting else float('nan'):.1f}; {describe(plan)}")
  return rows


def check(rows) -> list[tuple[str, bool]]:
  out = []
  for length in sorted({r["length"] for r in rows}):
    rs = [r for r in rows if r["length"] == length]
    plain = next(r for r in rs if r["name"] == "none")
    for r in rs:
      if r["kind"] != "planner" or not r["temp_bytes"]:
        continue
      best = r.get("best_preset_flops")
      fits = r["temp_bytes"] <= r["memory_bytes"]
      if r["name"].startswith("at "):
        out.append((f"T={length} {r['name']}: fits and flops <= the preset's "
                    f"({r['flops'] / best:.3f}x)", fits and r["flops"] <= best * (1 + 1e-4)))
      elif r["name"].startswith("between ") and best:
        out.append((f"T={length} {r['name']}: fits with fewer flops than the best preset that fits "
                    f"({r['flops'] / best:.3f}x)", fits and r["flops"] < best))
      elif r["name"] == "a third of plain":
        out.append((f"T={length} at a third of plain's memory: "
                    f"{plain['temp_bytes'] / r['temp_bytes']:.2f}x less memory than plain at "
                    f"{r['flops'] / plain['flops']:.3f}x its flops (goal at T=4096: "
                    ">= 3x at <= 1.10x)", fits and (length != 4096 or r["flops"] <= 1.10 * plain["flops"])))
  return out


def planning_time(depth: int = 24, length: int = 1024) -> float:
  """Seconds to plan a ``depth``-block chain with budget: menu, costs, DP and verification compiles."""
  layers, ps, x = chain(length, depth)
  plain = preset_profile("none", layers, ps, x).temp_bytes
  t = time.time()
  remat.sequential(layers, S.budget(plain // 3)).plan_for(ps, x)
  return time.time() - t


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lengths = sorted({r["length"] for r in rows})
  fig, axes = plt.subplots(1, len(lengths), figsize=(6.4 * len(lengths), 4.6), squeeze=False)
  for ax, length in zip(axes[0], lengths, strict=True):
    rs = [r for r in rows if r["length"] == length and r["temp_bytes"]]
    plain = next(r for r in rs if r["name"] == "none")
    for kind, marker, colour in (("preset", "o", "tab:blue"), ("planner", "x", "tab:red")):
      pts = [r for r in rs if r["kind"] == kind]
      ax.scatter([r["temp_bytes"] / 2**20 for r in pts], [r["flops"] / plain["flops"] for r in pts],
                 marker=marker, color=colour, label="MaxText preset" if kind == "preset" else "remat budget")
      if kind == "preset":
        for r in pts:
          ax.annotate(r["name"], (r["temp_bytes"] / 2**20, r["flops"] / plain["flops"]), fontsize=6,
                      textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("compiled temp memory of the training step (MiB, log)")
    ax.set_ylabel("flops / no remat")
    ax.set_title(f"Llama block x{DEPTH}, width {WIDTH}, length {length}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results")
  ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
  ap.add_argument("--skip-timing", action="store_true", help="do not time the planning of 24 blocks")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for length in args.lengths:
    rows += measure(length)
  cols = ["length", "kind", "name", "memory_bytes", "temp_bytes", "flops", "best_preset_flops", "seconds",
          "plan"]
  with open(os.path.join(args.out, "policies.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  plot(rows, os.path.join(args.out, "policies.png"))
  print("\nGoals, as measured:")
  for text, ok in check(rows):
    print(f"  [{'holds' if ok else 'DOES NOT HOLD'}] {text}")
  if not args.skip_timing:
    print(f"\nplanning 24 blocks at length 1024: {planning_time():.1f} s")
  print(f"\nwrote {os.path.join(args.out, 'policies.csv')}, {os.path.join(args.out, 'policies.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
