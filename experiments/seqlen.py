"""Varying sequence lengths under a device-memory budget.

Activation memory of a transformer's training step grows with the sequence
length (attention scores even quadratically), so a model that fits at 128
tokens can crash at 512. This sweep compiles the training step of a stack of
transformer blocks at several lengths:

  plain    plain backprop (`remat.linen.Sequential(blocks)`, no segmenter)
  budget   `remat.linen.Sequential(blocks, segmenter=budget(B, offload=host()))`:
           the planner makes a plan per traced length, keeping, offloading (where
           the backend executes host offload) or recomputing block inputs so that
           the compiled temp memory stays under B; where plain fits it recomputes
           nothing.

Prints a table (compiled device temp, host temp, recomputed layer evaluations,
fits) and writes `seqlen.csv` and `seqlen.png` to `--out`.

    python experiments/seqlen.py --out results [--lengths 64 128 256 512] [--budget 200MiB]
"""

from __future__ import annotations

import argparse
import csv
import os
import warnings

import jax
import jax.numpy as jnp

import remat
from remat import segmenters as S
from remat._src.cli import cli
from remat._src.util.units import format_bytes
from remat_bench import tradeoff
from remat_bench.models.linen import TransformerBlock


def make(depth, width, heads, segmenter):
  blocks = [TransformerBlock(width, heads=heads, dropout_rate=0.1) for _ in range(depth)]
  return remat.linen.Sequential(blocks, segmenter=segmenter)


def step_of(model):
  def step(v, x, key):
    loss = lambda v: jnp.mean(model.apply(v, x, True, rngs={"dropout": key}) ** 2)
    return jax.value_and_grad(loss)(v)
  return step


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
  ap.add_argument("--depth", type=int, default=8)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--budget", type=cli.size_arg, default=None,
                  help="device budget, e.g. 200MiB (default: 60%% of plain at the longest length)")
  ap.add_argument("--no-offload", action="store_true", help="plan recomputation only")
  ap.add_argument("--rounds", type=int, default=3, help="timed rounds per length (0: no timing)")
  ap.add_argument("--out", default="results")
  args = ap.parse_args(argv)

  key = jax.random.key(0)
  env = tradeoff.environment()
  offload = None if args.no_offload else remat.offload.host()

  def shapes(t):
    x = jax.ShapeDtypeStruct((args.batch, t, args.width), jnp.float32)
    v = jax.eval_shape(lambda: make(args.depth, args.width, args.heads, None).init(
        key, jnp.zeros(x.shape), False))
    return v, x

  plain_model = make(args.depth, args.width, args.heads, None)
  bar = tradeoff.make_progress(2 * len(args.lengths))
  plain = {}
  for t in args.lengths:
    bar.set_description(f"plain T={t}")
    plain[t] = remat.profile(step_of(plain_model), *shapes(t), key)
    bar.update(1)
  budget = args.budget or int(0.6 * plain[max(args.lengths)].temp_bytes)
  model = make(args.depth, args.width, args.heads, S.budget(budget, offload=offload))
  rows = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    for t in args.lengths:
      bar.set_description(f"budget T={t}")
      v, x = shapes(t)
      prof = remat.profile(step_of(model), v, x, key)
      real = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (v, x))
      plan = model.apply(*real, True, method="plan_for", rngs={"dropout": key})
      times = {}
      if args.rounds:
        fns = {"plain": remat.jit(step_of(plain_model)), "budget": remat.jit(step_of(model))}
        times = tradeoff.interleaved_medians({k: (lambda f=f, a=real: f(*a, key)) for k, f in fns.items()},
                                             rounds=args.rounds)
      rows.append(dict(seq_len=t, plain_temp_bytes=plain[t].temp_bytes, budget_bytes=budget,
                       planned_temp_bytes=prof.temp_bytes, planned_host_temp_bytes=prof.host_temp_bytes,
                       recomputed_evaluations=plan.recomputed_evaluations,
                       offloaded_bytes=getattr(plan, "offloaded_bytes", 0),
                       plain_fits=plain[t].temp_bytes <= budget, planned_fits=prof.temp_bytes <= budget,
                       time_ratio=(times["budget"] / times["plain"]) if times else float("nan"),
                       backend=env["backend"], device_kind=env["device_kind"]))
      bar.update(1)
  bar.close()

  mib = format_bytes
  print(f"\n{args.depth} transformer blocks, width {args.width}, batch {args.batch}; device budget "
        f"{mib(budget)}; offload {'on' if offload else 'off'} (executed on this backend: "
        f"{remat.offload.supported()}); {env['backend']} ({env['device_kind']})\n")
  print(tradeoff.markdown_table(
      ["seq len", "plain temp", "plain fits", "planned temp", "host temp", "recomputed evals",
       "offloaded", "planned fits", "time vs plain"],
      [[r["seq_len"], mib(r["plain_temp_bytes"]), r["plain_fits"], mib(r["planned_temp_bytes"]),
        mib(r["planned_host_temp_bytes"]), r["recomputed_evaluations"], mib(r["offloaded_bytes"]),
        r["planned_fits"], f"{r['time_ratio']:.2f}x"] for r in rows]))
  ok = all(r["planned_fits"] for r in rows)
  print(f"\nevery length under the budget: {ok}")

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "seqlen.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ls = [r["seq_len"] for r in rows]
  ax.plot(ls, [r["plain_temp_bytes"] / 2**20 for r in rows], "o-", label="plain backprop")
  ax.plot(ls, [r["planned_temp_bytes"] / 2**20 for r in rows], "s-", label="budget plan (device)")
  ax.axhline(budget / 2**20, color="k", ls="--", label="device budget")
  ax.set_xlabel("sequence length")
  ax.set_ylabel("compiled temp memory (MiB)")
  ax.set_xscale("log", base=2)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "seqlen.png"), dpi=110)
  print(f"wrote {os.path.join(args.out, 'seqlen.csv')} and seqlen.png")
  return rows


if __name__ == "__main__":
  main()
