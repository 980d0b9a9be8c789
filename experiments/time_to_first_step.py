"""Time to the first step: jax.jit's compile against remat.fit's search, its plan cache and jax's cache.

For a small GPT-like LM (``--model small``: 8 blocks, width 256, sequence 256, batch 8) or the
GPT-2-small-like step of experiments/fit.py (``--model gpt2``: 12 blocks, width 768, sequence
1024, batch 4), trained with AdamW (parameters and optimizer state donated), at two memories (50%
and 70% of the plain step's peak), each measurement runs in a fresh process (nothing cached in
memory; the first compile of a process also pays XLA's start-up, for every row alike), every row
once per repeat (default 3), the median reported:

  jax_jit        jax.jit(step).lower(...).compile() of the plain step
  jax_jit_xla    the same with jax's persistent compilation cache warm
  fit_first      remat.fit(step, memory).lower(...).compile(), plan cache empty
  fit_cached     the same in a new process, with the plan cache of fit_first
  fit_cached_xla the same, with jax's persistent compilation cache also warm
  budget_first   the blocks as a budget chain (``--model small`` only), empty plan cache
  budget_cached  the same in a new process, with the plan cache

Writes time_to_first_step_<model>.csv to --out and prints a Markdown table with ratios to jax_jit.

    python experiments/time_to_first_step.py --out results                # about 8 minutes on 2 CPU cores
    python experiments/time_to_first_step.py --model gpt2 --out results   # about 10 minutes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, optax, remat
from remat import segmenters as S
from remat_bench.models.gpt import GPT, shapes, train_step
what, memory, jax_cache, model_name = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
if jax_cache:
  jax.config.update("jax_compilation_cache_dir", jax_cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
opt = optax.adamw(3e-4)
size = dict(depth=8, width=256, heads=4, seq_len=256) if model_name == "small" else {}
batch = 8 if model_name == "small" else 4
out = {}
if what == "jax_jit":
  model = GPT(**size)
  args = shapes(model, opt, batch)
  t = time.perf_counter()
  compiled = jax.jit(train_step(model, opt), donate_argnums=(0, 1)).lower(*args).compile()
  out = {"seconds": time.perf_counter() - t, "compiles": 1,
         "peak": remat.Profile.from_compiled(compiled).peak_bytes}
elif what == "fit":
  model = GPT(**size, segmenter=S.auto())
  args = shapes(model, opt, batch)
  t = time.perf_counter()
  fitted = remat.fit(train_step(model, opt), int(memory), donate_argnums=(0, 1))
  compiled = fitted.lower(*args).compile()
  seconds = time.perf_counter() - t
  report = fitted.plans(*args)
  out = {"seconds": seconds, "compiles": report.compiles, "peak": report.profile.peak_bytes,
         "flops_vs_plain": report.profile.flops / report.plain_profile.flops,
         "plan": report.plans[0].made_by + ": " + report.plans[0].recomputation()}
else:  # budget
  model = GPT(**size, segmenter=S.budget(int(memory)))
  args = shapes(model, opt, batch)
  t = time.perf_counter()
  compiled = remat.jit(train_step(model, opt), donate_argnums=(0, 1)).lower(*args).compile()
  out = {"seconds": time.perf_counter() - t, "compiles": None,
         "peak": remat.Profile.from_compiled(compiled).peak_bytes}
print("RESULT " + json.dumps(out))
"""


MODEL = "small"


def child(what: str, memory: float, plan_cache: str, jax_cache: str = "") -> dict:
  env = {**os.environ, "REMAT_CACHE_DIR": plan_cache}
  proc = subprocess.run([sys.executable, "-c", CHILD, what, str(memory), jax_cache, MODEL], env=env,
                        capture_output=True, text=True, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="results")
  ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.7])
  ap.add_argument("--model", choices=["small", "gpt2"], default="small")
  ap.add_argument("--repeats", type=int, default=3, help="fresh processes per row (the median is reported)")
  args = ap.parse_args()
  global MODEL
  MODEL = args.model
  os.makedirs(args.out, exist_ok=True)
  samples: dict[tuple[str, int | str], list[dict]] = {}

  def sample(row: str, memory, result: dict) -> None:
    samples.setdefault((row, memory), []).append(result)

  peak = None
  for rep in range(args.repeats):  # every row once per repeat, so that the machine's drift hits all
    r = child("jax_jit", 0, "")
    peak = r["peak"]
    sample("jax_jit", "", r)
    with tempfile.TemporaryDirectory() as xla:
      child("jax_jit", 0, "", xla)  # fills jax's cache
      sample("jax_jit_xla", "", child("jax_jit", 0, "", xla))
    for frac in args.fractions:
      memory = int(frac * peak)
      with tempfile.TemporaryDirectory() as plans, tempfile.TemporaryDirectory() as xla:
        for name, cache_dir in (("fit_first", ""), ("fit_cached", ""), (None, xla), ("fit_cached_xla", xla)):
          r = child("fit", memory, plans, cache_dir)
          if name is not None:  # (None: fills jax's cache with the cached plans' executable)
            sample(name, memory, r)
    if MODEL == "small":
      # A budget chain bounded to half of the plain step's peak (the chain's temp is most of it).
      budget = int(0.5 * peak)
      with tempfile.TemporaryDirectory() as plans:
        for name in ("budget_first", "budget_cached"):
          sample(name, budget, child("budget", budget, plans))
    print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
  base = statistics.median(r["seconds"] for r in samples[("jax_jit", "")])
  rows = []
  for (row, memory), rs in samples.items():
    secs = sorted(r["seconds"] for r in rs)
    rows.append({**rs[-1], "row": row, "memory": memory, "seconds": statistics.median(secs),
                 "min_s": secs[0], "max_s": secs[-1]})
  cols = ["row", "memory", "seconds", "min_s", "max_s", "ratio", "compiles", "peak", "flops_vs_plain", "plan"]
  with open(os.path.join(args.out, f"time_to_first_step_{MODEL}.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({**r, "ratio": round(r["seconds"] / base, 2), "seconds": round(r["seconds"], 2),
                  "min_s": round(r["min_s"], 2), "max_s": round(r["max_s"], 2)})
  print(f"\n{MODEL}: median of {args.repeats} fresh processes each; jax.jit {base:.1f} s\n")
  print("| row | memory | seconds (min-max) | x jax.jit | compiles | plan |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['row']} | {r['memory']} | {r['seconds']:.1f} ({r['min_s']:.1f}-{r['max_s']:.1f}) | "
          f"{r['seconds'] / base:.2f} | {r['compiles']} | {r.get('plan', '')} |")


if __name__ == "__main__":
  t = time.perf_counter()
  main()
  print(f"({time.perf_counter() - t:.0f} s)")
