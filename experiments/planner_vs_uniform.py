"""The planner against uniform plans, at the memory each uniform plan compiles to.

Two chains: the heterogeneous one of docs/facts.md fact 12 (12 layers: a wide
64 -> 512 -> 64 layer, then two cheap ``sin(x) * s`` ones, batch 2048) and a
transformer chain (8 pre-LN blocks with dropout, width 64, 4 heads, sequence 64,
batch 8). For every uniform plan (``every(k)``, ``revolve(s)``, ``multilevel(2)``):

* ``budget``: the chain's reference step compiled under the uniform plan gives
  a memory ``m``; ``budget(m)`` must compile to at most ``m`` with no more flops;
* ``fit``: a whole SGD step (parameters donated) compiled under the uniform plan
  gives a per-device peak ``M``; ``remat.fit(step, M)`` with ``auto()`` must fit
  ``M`` with no more flops.

Also prints the predicted against compiled temp memory of every uniform plan.

    python experiments/planner_vs_uniform.py --out results
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import jax
import jax.numpy as jnp

import remat
from remat import segmenters as S
from remat_bench import chains


def hetero():
  wide = lambda p, x: jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"])  # noqa: E731
  sine = lambda s, x: jnp.sin(x) * s  # noqa: E731
  layers = [wide if i % 3 == 0 else sine for i in range(12)]
  ps = [{"a": jnp.full((64, 512), 0.02), "b": jnp.full((512, 64), 0.02)} if f is wide
        else jnp.float32(0.9) for f in layers]
  return layers, ps, jnp.ones((2048, 64)), None, 2048 * 64 * 4


def transformer():
  ch = chains.Chain(model="transformer", depth=8, width=64, batch=8, seq_len=64, heads=4)
  ps, x, key = ch.init()
  return ch.layers, ps, x, key, ch.activation_bytes


def sgd(layers, seg):
  apply = remat.sequential(layers, seg)

  def step(ps, x, key):
    loss, g = jax.value_and_grad(lambda ps: jnp.mean(apply(ps, x, key) ** 2))(ps)
    return jax.tree_util.tree_map(lambda p, d: p - 0.01 * d, ps, g), loss
  return step


def measure(name, chain) -> list[dict]:
  layers, ps, x, key, act = chain
  rows = []
  segs = [S.every(k) for k in (1, 2, 3, 4, 6)] + [S.revolve(s) for s in (2, 3, 4)] + [S.multilevel(2)]
  for seg in segs:
    u = remat.sequential(layers, seg).plan_for(ps, x, key, compile=True)
    m = u.compiled_temp_bytes
    b = remat.sequential(layers, S.budget(m)).plan_for(ps, x, key)
    whole = remat.profile(remat.jit(sgd(layers, seg), donate_argnums=0), ps, x, key)
    rep = remat.fit(sgd(layers, S.auto()), whole.peak_bytes, donate_argnums=0).plans(ps, x, key)
    rows.append(dict(
        chain=name, uniform=repr(seg), uniform_evals=u.forward_evaluations,
        predicted_act=round(u.predicted_peak_bytes / act, 2), compiled_act=round(m / act, 2),
        prediction_error=round(u.predicted_peak_bytes / m - 1, 4),
        budget_evals=b.forward_evaluations, budget_act=round(b.compiled_temp_bytes / act, 2),
        budget_flops_vs_uniform=round(b.predicted_flops / u.predicted_flops, 4),
        step_peak_mib=round(whole.peak_bytes / 2**20, 2),
        fit_peak_mib=round(rep.profile.peak_bytes / 2**20, 2),
        fit_flops_vs_uniform=round(rep.profile.flops / whole.flops, 4),
        fit_evals=rep.plans[0].forward_evaluations, fit_compiles=rep.compiles))
    print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results")
  args = ap.parse_args(argv)
  rows = measure("heterogeneous", hetero()) + measure("transformer", transformer())
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "planner_vs_uniform.csv")
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  print("\n| chain | uniform | evals | predicted / compiled temp (act) "
        "| budget: evals, temp, flops vs uniform | whole step peak | fit: peak, flops vs uniform, evals |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['chain']} | {r['uniform']} | {r['uniform_evals']} | "
          f"{r['predicted_act']} / {r['compiled_act']} "
          f"({100 * r['prediction_error']:+.1f}%) | {r['budget_evals']}, {r['budget_act']}, "
          f"{r['budget_flops_vs_uniform']:.3f}x | {r['step_peak_mib']} MiB | {r['fit_peak_mib']} MiB, "
          f"{r['fit_flops_vs_uniform']:.3f}x, {r['fit_evals']} |")
  worse = [r for r in rows if r["budget_flops_vs_uniform"] > 1 + 1e-6 or r["fit_flops_vs_uniform"] > 1 + 1e-4
           or r["fit_peak_mib"] > r["step_peak_mib"]]
  print(f"\nwrote {path}; planner worse than a uniform plan in {len(worse)} of {len(rows)} cases")
  return 0


if __name__ == "__main__":
  sys.exit(main())
