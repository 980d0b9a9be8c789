"""The largest batch that fits a device: plain backprop, nn.remat, dots_saveable and remat.fit.

A GPT-2-small-like language model (12 blocks, width 768, 12 heads, an 8192-token
vocabulary, sequence length 1024, dropout 0.1) is trained with AdamW (optax),
parameters and optimizer state donated, in float32 and in bfloat16. For each
device memory (8, 16 and 24 GiB by default) and each way of training, the
script finds the largest batch whose compiled step has a per-device peak
(``remat.Profile.peak_bytes``: arguments + outputs + temporaries - donated) at
most that memory, and reports the flops per token of that step against plain
backprop's. Nothing runs: every number is read from the compiled program
(``memory_analysis()``, ``cost_analysis()``), so it works on a CPU for any
memory.

  plain       every block taped
  nn_remat    flax.linen.remat on every block (full recomputation)
  dots        flax.linen.remat with jax's dots_saveable policy on every block
  remat_fit   the blocks as one remat.linen.Sequential chain, segmenters.auto(), remat.fit(step, memory)

Writes fit.csv and fit.png to --out and prints the table.

    python experiments/fit.py --out results          # about an hour on 2 CPU cores
    python experiments/fit.py --quick --out results  # float32, 8 GiB only
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import remat
from remat import segmenters as S
from remat_bench.models.gpt import GPT, shapes, train_step

GiB = 2**30
METHODS = ("plain", "nn_remat", "dots", "remat_fit")
COLUMNS = ["dtype", "memory_gib", "method", "max_batch", "peak_bytes", "flops_per_token",
           "flops_vs_plain", "compiles", "plan", "seconds"]


def model_for(method: str, dtype) -> GPT:
  if method == "plain":
    return GPT(dtype=dtype)
  if method == "nn_remat":
    return GPT(dtype=dtype, block_wrapper=functools.partial(nn.remat, static_argnums=(2,)))
  if method == "dots":
    return GPT(dtype=dtype, block_wrapper=functools.partial(
        nn.remat, static_argnums=(2,), policy=jax.checkpoint_policies.dots_saveable))
  if method == "every1":
    return GPT(dtype=dtype, segmenter=S.every(1))
  return GPT(dtype=dtype, segmenter=S.auto())


OPT = optax.adamw(3e-4)


@functools.lru_cache(maxsize=None)
def compiled(method: str, dtype_name: str, batch: int) -> remat.Profile:
  """The profile of one fixed way of training at one batch size."""
  model = model_for(method, jnp.dtype(dtype_name))
  return remat.profile(remat.jit(train_step(model, OPT), donate_argnums=(0, 1)), *shapes(model, OPT, batch))


def largest_fixed(method: str, dtype_name: str, memory: int) -> tuple[int, remat.Profile | None]:
  """The largest batch of a fixed method: peak is affine in the batch, then checked by compiling."""
  p1, p2 = compiled(method, dtype_name, 1), compiled(method, dtype_name, 2)
  per = max(p2.peak_bytes - p1.peak_bytes, 1)
  b = max(int((memory - p1.peak_bytes) // per) + 1, 0)
  while b > 0 and compiled(method, dtype_name, b).peak_bytes > memory:
    b -= 1
  while compiled(method, dtype_name, b + 1).peak_bytes <= memory:
    b += 1
  return b, (compiled(method, dtype_name, b) if b else None)


@functools.lru_cache(maxsize=None)
def fitted(dtype_name: str, memory: int, batch: int):
  """remat.fit at one batch: the report, or None where nothing fits."""
  model = model_for("remat_fit", jnp.dtype(dtype_name))
  step = remat.fit(train_step(model, OPT), memory, donate_argnums=(0, 1))
  try:
    return step.plans(*shapes(model, OPT, batch))
  except ValueError:
    return None


def largest_fit(dtype_name: str, memory: int) -> int:
  """The largest batch remat.fit can fit. fit needs at least the peak of its smallest plan, in
  practice every block checkpointed (affine in the batch), so that line gives the candidate; fit
  itself decides at the candidate and one above it."""
  b, _ = largest_fixed("every1", dtype_name, memory)
  while b > 0 and fitted(dtype_name, memory, b) is None:
    b -= 1
  while fitted(dtype_name, memory, b + 1) is not None:
    b += 1
  return b


def row(dtype_name, memory, method, batch, prof, plain_fpt, compiles="", plan="", seconds=0.0):
  tokens = batch * GPT.seq_len
  fpt = prof.flops / tokens if prof is not None and batch else float("nan")
  return dict(dtype=dtype_name, memory_gib=memory / GiB, method=method, max_batch=batch,
              peak_bytes=prof.peak_bytes if prof is not None else 0, flops_per_token=fpt,
              flops_vs_plain=fpt / plain_fpt, compiles=compiles, plan=plan, seconds=round(seconds, 1))


def plan_summary(report) -> str:
  p = report.plans[0]
  ck = sum(1 for c in p.root.children if c.checkpoint)
  return f"{p.forward_evaluations} block evaluations, {ck} checkpointed segments ({p.made_by})"


def measure(dtype_name: str, memory: int, log=print) -> list[dict]:
  rows = []
  plain_fpt = compiled("plain", dtype_name, 1).flops / GPT.seq_len
  for method in ("plain", "nn_remat", "dots"):
    t = time.time()
    b, prof = largest_fixed(method, dtype_name, memory)
    rows.append(row(dtype_name, memory, method, b, prof, plain_fpt, seconds=time.time() - t))
    log(f"  {dtype_name} {memory / GiB:.0f} GiB {method}: batch {b}")
  t = time.time()
  b = largest_fit(dtype_name, memory)
  rep = fitted(dtype_name, memory, b) if b else None
  rows.append(row(dtype_name, memory, "remat_fit", b, rep.profile if rep else None, plain_fpt,
                  rep.compiles if rep else "", plan_summary(rep) if rep else "", time.time() - t))
  log(f"  {dtype_name} {memory / GiB:.0f} GiB remat_fit: batch {b}")
  # remat.fit at 4x plain's batch, and at nn.remat's largest batch: the flops it needs there.
  plain_b = rows[0]["max_batch"]
  for label, target in (("remat_fit@4x_plain", 4 * plain_b), ("remat_fit@nn_remat", rows[1]["max_batch"])):
    rep = fitted(dtype_name, memory, target) if 0 < target <= max(b, 0) else None
    rows.append(row(dtype_name, memory, label, target if rep else 0, rep.profile if rep else None,
                    plain_fpt, rep.compiles if rep else "", plan_summary(rep) if rep else ""))
  return rows


def table(rows) -> str:
  head = "| dtype | memory | method | largest batch (T=1024) | peak | flops/token vs plain |"
  lines = [head, "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['dtype']} | {r['memory_gib']:.0f} GiB | {r['method']} | {r['max_batch']} | "
                 f"{r['peak_bytes'] / GiB:.2f} GiB | {r['flops_vs_plain']:.3f}x |")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
  fig, axes = plt.subplots(1, len(dtypes), figsize=(6.4 * len(dtypes), 4.4), squeeze=False)
  colours = {"plain": "tab:blue", "nn_remat": "tab:orange", "dots": "tab:green", "remat_fit": "tab:red"}
  for ax, dt in zip(axes[0], dtypes, strict=True):
    mems = sorted({r["memory_gib"] for r in rows if r["dtype"] == dt})
    for j, m in enumerate(METHODS):
      rs = [next(r for r in rows if r["dtype"] == dt and r["memory_gib"] == g and r["method"] == m)
            for g in mems]
      xs = [i + (j - 1.5) * 0.2 for i in range(len(mems))]
      bars = ax.bar(xs, [r["max_batch"] for r in rs], width=0.2, color=colours[m], label=m)
      for bar, r in zip(bars, rs, strict=True):
        if r["max_batch"]:
          ax.annotate(f"{r['flops_vs_plain']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(mems)), [f"{g:.0f} GiB" for g in mems])
    ax.set_xlabel("device memory (per device)")
    ax.set_ylabel("largest batch at sequence length 1024 (sequences)")
    ax.set_title(f"GPT-2 small, AdamW, {dt}: largest batch (labels: flops/token vs plain)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results", help="directory for fit.csv and fit.png")
  ap.add_argument("--memories", type=float, nargs="+", default=None, help="GiB per device (default 8 16 24)")
  ap.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
  ap.add_argument("--quick", action="store_true", help="float32 at 8 GiB only")
  args = ap.parse_args(argv)
  memories = args.memories or ([8] if args.quick else [8, 16, 24])
  dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for dt in dtypes:
    for m in memories:
      rows += measure(dt, int(m * GiB))
      with open(os.path.join(args.out, "fit.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
  print(f"\nmeasured on {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}\n")
  print(table(rows))
  plot([r for r in rows if r["method"] in METHODS], os.path.join(args.out, "fit.png"))
  print(f"\nwrote {os.path.join(args.out, 'fit.csv')}, {os.path.join(args.out, 'fit.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
