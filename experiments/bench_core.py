"""Benchmark of the core transform (issue 2): plain backprop vs `jax.checkpoint`
vs `remat.checkpoint`, each block of a 12-block Flax transformer with dropout.

Every method compiles with `remat.jit` (on CPU: XLA's barrier-expander pass off,
without which CPU undoes any rematerialization), so the comparison is fair.
Prints compiled temp memory, flops and median step time (interleaved runs),
as ratios against `jax.checkpoint`.

    python experiments/bench_core.py [--blocks 12 --batch 8 --seq 128 --width 256 --rounds 15]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

import remat
from remat_bench import tradeoff


class Block(nn.Module):
  """Pre-LN transformer block with causal self-attention and dropout."""

  width: int
  heads: int
  rate: float = 0.1

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.rate,
                                        deterministic=False)(
        h, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
    x = x + nn.Dropout(self.rate, deterministic=False)(h)
    h = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
    h = nn.Dense(self.width)(nn.gelu(h))
    return x + nn.Dropout(self.rate, deterministic=False)(h)


def make_step(block: Block, wrap):
  def apply_block(p, x, key):
    return block.apply(p, x, rngs={"dropout": key})

  f = wrap(apply_block)

  def loss(params, x, key):
    keys = remat.rng.layer_keys(key, len(params))
    for i, p in enumerate(params):
      x = f(p, x, keys[i])
    return jnp.mean(x ** 2)

  return jax.value_and_grad(loss)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--blocks", type=int, default=12)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=15)
  args = ap.parse_args(argv)

  block = Block(args.width, args.heads)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, args.width))
  keys = jax.random.split(jax.random.key(1), args.blocks)
  params = [block.init({"params": k, "dropout": k}, x) for k in keys]
  key = jax.random.key(2)

  methods = {
      "plain": lambda f: f,
      "jax.checkpoint": jax.checkpoint,
      "remat.checkpoint": remat.checkpoint,
  }
  steps = {name: remat.jit(make_step(block, wrap)) for name, wrap in methods.items()}
  profiles = {name: remat.profile(step, params, x, key) for name, step in steps.items()}

  # Same numbers: gradients agree with plain backprop.
  ref = steps["plain"](params, x, key)
  for name in ("jax.checkpoint", "remat.checkpoint"):
    got = steps[name](params, x, key)
    err = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref),
                              strict=True))
    print(f"max |grad({name}) - grad(plain)| = {err:.2e}")

  times = tradeoff.interleaved_medians(
      {name: (lambda s=step: s(params, x, key)) for name, step in steps.items()},
      rounds=args.rounds)
  env = tradeoff.environment()
  print(f"\n{args.blocks}-block transformer, batch {args.batch}, seq {args.seq}, width "
        f"{args.width}, dropout 0.1 — {env['backend']} ({env['device_kind']}), jax {env['jax']}\n")
  peer = "jax.checkpoint"
  rows = []
  for name in methods:
    p, t = profiles[name], times[name]
    rows.append([name, f"{p.temp_bytes / 2**20:,.1f} MiB", f"{p.temp_bytes / profiles[peer].temp_bytes:.3f}",
                 f"{p.flops / 1e9:.2f}", f"{p.flops / profiles[peer].flops:.3f}",
                 f"{t * 1e3:.1f}", f"{t / times[peer]:.3f}"])
  print(tradeoff.markdown_table(["method", "temp", "temp / jax.ckpt", "GFLOP", "flops / jax.ckpt",
                       "step ms (median)", "time / jax.ckpt"], rows))


if __name__ == "__main__":
  main()
