"""Every segmenter on a 24-block transformer, against plain backprop and Flax's remat.

One process, one model: ``remat_bench.models.linen.TransformerBlock`` x ``--depth``
with dropout, a training step ``value_and_grad`` of the mean output (and an
SGD update), compiled with ``remat.jit`` so XLA:CPU keeps every variant's
rematerialization. Variants:

  plain               flax ``nn.Sequential``-style loop, no checkpointing
  flax remat/block    ``nn.remat(TransformerBlock)`` per block
  flax remat_scan     ``nn.remat_scan`` over the blocks (lengths as near sqrt(depth) as divides)
  remat every(k) ...  ``remat.linen.Sequential(blocks, segmenter=...)`` for every segmenter,
                      and ``budget(m)`` at half of plain's temp memory

For each: compiled temp memory and flops (``remat.profile``), forward
evaluations of the plan, and the median step time over interleaved rounds
(the order rotates every round so all variants see the same machine load).
Ratios are against plain, measured in the same process.

  python experiments/bench_segmenters.py [--depth 24] [--batch 4] [--seq-len 128] [--rounds 7]
"""

from __future__ import annotations

import argparse
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import remat
from remat import segmenters as S
from remat_bench.models.linen import TransformerBlock


class Loop(nn.Module):
  """Blocks in a Python loop (plain, or each wrapped with ``nn.remat``)."""

  depth: int
  width: int
  heads: int
  wrap: bool = False

  @nn.compact
  def __call__(self, x, train):
    cls = nn.remat(TransformerBlock, static_argnums=(2,)) if self.wrap else TransformerBlock
    for i in range(self.depth):
      x = cls(self.width, self.heads, dropout_rate=0.1, name=f"layers_{i}")(x, train)
    return x


class TrainBlock(nn.Module):
  """A carry-only block for ``nn.remat_scan`` (train mode)."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    return TransformerBlock(self.width, self.heads, dropout_rate=0.1, name="block")(x, True)


class RematScan(nn.Module):
  depth: int
  width: int
  heads: int

  @nn.compact
  def __call__(self, x, train):
    del train
    k = max(d for d in range(1, self.depth + 1) if self.depth % d == 0 and d <= math.isqrt(self.depth))
    stack = nn.remat_scan(TrainBlock, lengths=(self.depth // k, k))
    return stack(self.width, self.heads, name="stack")(x)


def ours(args, seg):
  return remat.linen.Sequential(
      [TransformerBlock(args.width, args.heads, dropout_rate=0.1) for _ in range(args.depth)],
      segmenter=seg)


def make_step(model):
  def step(v, x, key):
    loss, g = jax.value_and_grad(
        lambda v: jnp.mean(model.apply(v, x, True, rngs={"dropout": key}) ** 2))(v)
    return jax.tree_util.tree_map(lambda a, b: a - 1e-3 * b, v, g), loss
  return remat.jit(step)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--depth", type=int, default=24)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--skip-none", action="store_true", help="skip none() (D(D+1)/2 evaluations)")
  args = ap.parse_args()

  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq_len, args.width))
  key = jax.random.key(2)
  variants = {
      "plain": Loop(args.depth, args.width, args.heads),
      "flax remat/block": Loop(args.depth, args.width, args.heads, wrap=True),
      "flax remat_scan": RematScan(args.depth, args.width, args.heads),
  }
  segs = [S.every(1), S.every(4), S.sqrt(), S.multilevel(2), S.revolve(4), S.revolve(8)]
  if not args.skip_none:
    segs.append(S.none())
  for s in segs:
    variants[f"remat {s!r}"] = ours(args, s)

  rows, steps, params = {}, {}, {}

  def measure(name, model):
    t0 = time.perf_counter()
    v = model.init(jax.random.key(0), x[:, :8], False)
    step = make_step(model)
    prof = remat.profile(step, v, x, key)
    plan = None
    if isinstance(model, remat.linen.Sequential):
      plan = model.apply(v, x, True, rngs={"dropout": key}, method="plan_for")
    compiled = step.lower(v, x, key).compile()
    jax.block_until_ready(compiled(v, x, key))
    rows[name] = dict(temp=prof.temp_bytes, flops=prof.flops,
                      evals=plan.forward_evaluations if plan else None,
                      setup=time.perf_counter() - t0)
    steps[name], params[name] = compiled, v
    print(f"  prepared {name:28s} in {rows[name]['setup']:6.1f} s", flush=True)

  for name, model in variants.items():
    measure(name, model)
  m = rows["plain"]["temp"] // 2
  measure(f"remat budget({m})", ours(args, S.budget(m)))

  names = list(steps)
  times = {n: [] for n in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      t0 = time.perf_counter()
      jax.block_until_ready(steps[n](params[n], x, key))
      times[n].append(time.perf_counter() - t0)

  base = rows["plain"]
  print(f"\n{args.depth}-block transformer, batch {args.batch}, length {args.seq_len}, width "
        f"{args.width}; backend {jax.default_backend()}; median of {args.rounds} interleaved rounds")
  print(f"{'variant':30s} {'temp MiB':>9s} {'x plain':>8s} {'flops x':>8s} {'fwd evals':>9s} "
        f"{'step ms':>8s} {'time x':>7s}")
  t_plain = np.median(times["plain"])
  for n in names:
    r, t = rows[n], np.median(times[n])
    ev = "-" if r["evals"] is None else str(r["evals"])
    fx = f"{r['flops'] / base['flops']:8.3f}" + ("*" if "scan" in n else " ")
    print(f"{n:30s} {r['temp'] / 2**20:9.2f} {r['temp'] / base['temp']:8.3f} "
          f"{fx} {ev:>8s} {1e3 * t:8.1f} {t / t_plain:7.3f}")
  print("* XLA's cost analysis counts a scan body once, not once per iteration.")


if __name__ == "__main__":
  main()
