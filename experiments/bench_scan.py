"""Scanned Flax stacks: compile time and compiled memory against flax's scans, at depths 12/24/48.

For each depth, the training step (``value_and_grad`` of a loss of the stack's
output, dropout on) of a stack of ``remat_bench`` TransformerBlocks is
compiled as (pairs at the same segmentation):

  linen  every(1)   nn.scan(nn.remat(Block))                vs remat.linen.scan(Block, segmenter=every(1))
  linen  every(k)   nn.remat_scan(Block, lengths=(N/k, k))  vs remat.linen.scan(Block, segmenter=every(k))
  nnx    every(1)   nnx.scan(nnx.remat(f)) over nnx.vmap    vs remat.nnx.Scan(..., segmenter=every(1))

Compile time: ``jax.jit(step).lower(...).compile(remat.compiler_options())``
(trace, lower and compile) of a freshly built model and step, the median of
``--rounds`` compiles, the variants interleaved so that all see the same
machine load. Memory: ``temp_size_in_bytes`` of the compiled step (with the
options that keep rematerialization on XLA:CPU, docs/facts.md, fact 1).
Ratios are ours / flax's, measured in the same process.

  python experiments/bench_scan.py [--depths 12 24 48] [--rounds 3] [--k 4] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import remat
from remat import segmenters as S
from remat_bench.models import linen as linen_models
from remat_bench.models import nnx as nnx_models


class TrainBlock(linen_models.TransformerBlock):
  """The linen block in training mode, called with ``x`` only (``nn.remat_scan`` passes nothing else)."""

  def __call__(self, x):
    return super().__call__(x, True)


class CarryBlock(TrainBlock):
  """``nn.scan``'s body convention: ``(carry, ys)``."""

  def __call__(self, x, _):
    return super().__call__(x), None


def linen_step(module, *, pair_out: bool):
  def loss(params, x, key):
    y = module.apply({"params": params}, x, *((None,) if pair_out else ()), rngs={"dropout": key})
    return jnp.mean((y[0] if pair_out else y) ** 2)
  return jax.value_and_grad(loss)


def linen_variants(n, k, args):
  block = dict(width=args.width, heads=args.heads, dropout_rate=0.1)
  splits = {"params": True, "dropout": True}
  x = jax.ShapeDtypeStruct((args.batch, args.seq_len, args.width), jnp.float32)

  def build(kind):
    if kind == "flax every(1)":
      m = nn.scan(nn.remat(CarryBlock), variable_axes={"params": 0}, split_rngs=splits, length=n)(**block)
      return m, linen_step(m, pair_out=True), (x, None)
    if kind == f"flax every({k})":
      m = nn.remat_scan(TrainBlock, lengths=(n // k, k), variable_axes={"params": 0},
                        split_rngs=splits)(**block)
      return m, linen_step(m, pair_out=False), (x,)
    seg = S.every(1) if kind == "ours every(1)" else S.every(k)
    m = remat.linen.scan(TrainBlock, length=n, segmenter=seg, variable_axes={"params": 0},
                         split_rngs=splits)(**block)
    return m, linen_step(m, pair_out=False), (x,)

  def prepare(kind):
    m, _, init_args = build(kind)
    zeros = [None if a is None else jnp.zeros(a.shape) for a in init_args]
    params = jax.eval_shape(lambda: m.init(jax.random.key(0), *zeros))["params"]
    # A new module and step each time: nothing traced before is reused.
    key = jax.random.key(0)
    return lambda: jax.jit(build(kind)[1]).lower(params, x, key).compile(remat.compiler_options())

  return {kind: prepare(kind) for kind in ("flax every(1)", "ours every(1)", f"flax every({k})",
                                           f"ours every({k})")}


def nnx_variants(n, args):
  x = jax.ShapeDtypeStruct((args.batch, args.seq_len, args.width), jnp.float32)

  def make_block(rngs):
    return nnx_models.TransformerBlock(args.width, args.heads, dropout_rate=0.1, rngs=rngs)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  @nnx.remat
  def forward(x, block):
    return block(x)

  class FlaxStack(nnx.Module):
    def __init__(self, rngs):
      self.layers = remat.nnx.stack(make_block, length=n, rngs=rngs)

    def __call__(self, x):
      return forward(x, self.layers)

  def build(kind):
    rngs = nnx.Rngs(params=0, dropout=1)
    if kind == "flax every(1)":
      return FlaxStack(rngs)
    return remat.nnx.Scan(make_block, length=n, rngs=rngs, segmenter=S.every(1))

  def prepare(kind):
    graphdef, params, rest = nnx.split(build(kind), nnx.Param, ...)

    def compile_fresh():  # a new step function: nothing traced before is reused
      def step(params, rest, x):
        model = nnx.merge(graphdef, params, rest)
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        return loss, g, nnx.split(model, nnx.Param, ...)[2]
      return jax.jit(step).lower(params, rest, x).compile(remat.compiler_options())

    return compile_fresh

  return {kind: prepare(kind) for kind in ("flax every(1)", "ours every(1)")}


def measure(variants, rounds):
  times = {kind: [] for kind in variants}
  temp = {}
  for r in range(rounds):
    order = list(variants)
    order = order[r % len(order):] + order[:r % len(order)]  # rotate: no variant always compiles first
    for kind in order:
      t0 = time.perf_counter()
      compiled = variants[kind]()
      times[kind].append(time.perf_counter() - t0)
      temp[kind] = compiled.memory_analysis().temp_size_in_bytes
  return {kind: (statistics.median(ts), temp[kind]) for kind, ts in times.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--k", type=int, default=4, help="segment size of the every(k) / nn.remat_scan pair")
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--csv", default=None)
  args = ap.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.default_backend()}; width {args.width}, seq {args.seq_len}, "
        f"batch {args.batch}, dropout 0.1; median of {args.rounds} compiles")
  rows = []
  for n in args.depths:
    if n % args.k:
      raise SystemExit(f"--k {args.k} must divide every depth (got {n})")
    for api, variants in (("linen", linen_variants(n, args.k, args)), ("nnx", nnx_variants(n, args))):
      res = measure(variants, args.rounds)
      for seg in sorted({kind.split(" ", 1)[1] for kind in res}):
        (tf, mf), (to, mo) = res[f"flax {seg}"], res[f"ours {seg}"]
        rows.append(dict(api=api, depth=n, segmentation=seg, flax_compile_s=round(tf, 3),
                         ours_compile_s=round(to, 3), compile_ratio=round(to / tf, 3),
                         flax_temp_mib=round(mf / 2**20, 3), ours_temp_mib=round(mo / 2**20, 3),
                         temp_ratio=round(mo / mf, 4)))
        r = rows[-1]
        print(f"{api:5s} depth {n:3d} {seg:9s} compile {tf:6.2f}s flax, {to:6.2f}s ours "
              f"({r['compile_ratio']:.2f}x)   temp {r['flax_temp_mib']:8.2f} MiB flax, "
              f"{r['ours_temp_mib']:8.2f} MiB ours ({r['temp_ratio']:.4f}x)", flush=True)
  if args.csv:
    with open(args.csv, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)


if __name__ == "__main__":
  main()
