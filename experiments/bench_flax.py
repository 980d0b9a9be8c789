"""Benchmark the Flax adapters against Flax's own remat on a 6-block transformer LM.

Five training steps (loss, gradients, SGD update) of the same
``remat_bench.models`` TransformerLM with dropout, compiled with ``remat.jit`` (so
XLA:CPU keeps every variant's rematerialization):

  plain                     no checkpointing (linen)
  flax.linen.remat          per-block, static_argnums=(2,)
  remat.linen.checkpoint    per-block, static_argnums=(2,)
  flax.nnx.remat            per-block
  remat.nnx.checkpoint      per-block

For each: compiled temp bytes, peak bytes and flops (``remat.profile``), and
the median step time over interleaved rounds (the order rotates each round,
so all variants see the same machine load). Ratios are against the Flax peer
measured in the same process.

  python experiments/bench_flax.py [--rounds 21] [--batch 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import remat
from remat_bench.models import data
from remat_bench.models import linen as linen_models
from remat_bench.models import nnx as nnx_models


def xent(logits, targets):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()


def linen_variant(args, wrapper):
  model = linen_models.TransformerLM(
      vocab=data.VOCAB_SIZE, seq_len=args.seq_len, depth=args.depth, width=args.width,
      heads=args.heads, dropout_rate=0.1, block_wrapper=wrapper)
  x = jnp.zeros((args.batch, args.seq_len), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]

  def step(params, x, y, key):
    loss, g = jax.value_and_grad(
        lambda p: xent(model.apply({"params": p}, x, True, rngs={"dropout": key}), y))(params)
    return jax.tree_util.tree_map(lambda a, b: a - 1e-3 * b, params, g), loss

  return params, step


def nnx_variant(args, wrapper):
  model = nnx_models.TransformerLM(
      vocab=data.VOCAB_SIZE, seq_len=args.seq_len, depth=args.depth, width=args.width,
      heads=args.heads, dropout_rate=0.1, block_wrapper=wrapper, rngs=nnx.Rngs(0, dropout=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(state, x, y, key):
    del key  # the model's own dropout stream (in `rest`) provides the keys
    model = nnx.merge(graphdef, *state)
    loss, g = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return (jax.tree_util.tree_map(lambda a, b: a - 1e-3 * b, params, g), rest), loss

  return (params, rest), step


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--depth", type=int, default=6)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--rounds", type=int, default=21)
  args = p.parse_args(argv)

  variants = {
      "plain": (linen_variant, None),
      "flax.linen.remat": (linen_variant, functools.partial(nn.remat, static_argnums=(2,))),
      "remat.linen.checkpoint": (linen_variant,
                                 functools.partial(remat.linen.checkpoint, static_argnums=(2,))),
      "flax.nnx.remat": (nnx_variant, nnx.remat),
      "remat.nnx.checkpoint": (nnx_variant, remat.nnx.checkpoint),
  }
  x, y = (jnp.asarray(a) for a in next(data.lm_batches(args.batch, args.seq_len, seed=0)))
  key = jax.random.key(0)
  runs = {}
  for name, (make, wrapper) in variants.items():
    state, step = make(args, wrapper)
    prof = remat.profile(step, state, x, y, key)
    fn = remat.jit(step)
    jax.block_until_ready(fn(state, x, y, key))  # compile and warm up
    runs[name] = dict(state=state, fn=fn, profile=prof, times=[])

  names = list(runs)
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      run = runs[name]
      t0 = time.perf_counter()
      jax.block_until_ready(run["fn"](run["state"], x, y, key))
      run["times"].append(time.perf_counter() - t0)

  mib = lambda b: b / 2**20
  print(f"TransformerLM: depth {args.depth}, width {args.width}, heads {args.heads}, batch "
        f"{args.batch}, seq {args.seq_len}; {args.rounds} interleaved rounds, backend "
        f"{jax.default_backend()}")
  print(f"{'variant':>24} {'temp MiB':>9} {'peak MiB':>9} {'GFLOP':>8} {'median ms':>10}")
  med = {}
  for name, run in runs.items():
    pr = run["profile"]
    med[name] = float(np.median(run["times"]))
    print(f"{name:>24} {mib(pr.temp_bytes):>9.2f} {mib(pr.peak_bytes):>9.2f} "
          f"{pr.flops / 1e9:>8.3f} {med[name] * 1e3:>10.1f}")

  def opcodes(hlo):
    return collections.Counter(re.findall(r"=\s*\S+\s+([a-z][a-z0-9\-]*)\(", hlo))

  def ratio(a, b):
    pa, pb = runs[a]["profile"], runs[b]["profile"]
    same = opcodes(pa.hlo) == opcodes(pb.hlo)
    print(f"{a} / {b}: temp {pa.temp_bytes / pb.temp_bytes:.3f}, peak "
          f"{pa.peak_bytes / pb.peak_bytes:.3f}, flops {pa.flops / pb.flops:.3f}, "
          f"time {med[a] / med[b]:.3f}; same HLO instruction counts per opcode: {same}")

  print()
  ratio("remat.linen.checkpoint", "flax.linen.remat")
  ratio("remat.nnx.checkpoint", "flax.nnx.remat")
  ratio("remat.linen.checkpoint", "plain")
  ratio("remat.nnx.checkpoint", "plain")
  return runs


if __name__ == "__main__":
  main()
