"""Ours against every peer, one process, same models: memory, flops and step time as ratios.

Pairs (ours / peer), on a stack of ``remat_bench.models.linen.TransformerBlock``s
with dropout (width, heads, batch, seq_len below), each a training step
``value_and_grad`` compiled with ``remat.jit`` (on CPU the option that keeps
rematerialization, for the peers too):

  per block         remat.checkpoint            / jax.checkpoint            (functional block.apply)
  linen             remat.linen.checkpoint      / flax.linen.remat          (TransformerLM block_wrapper)
  nnx               remat.nnx.checkpoint        / flax.nnx.remat            (nnx TransformerLM block_wrapper)
  scanned stack     remat.sequential(every(k))  / flax.linen.remat_scan     (stacked parameters, nested scan)
  offload           remat.checkpoint(policy=dots_with_no_batch_dims_saveable, offload=remat.offload.host())
                    / jax.checkpoint(policy=offload_dot_with_no_batch_dims("device", "pinned_host"))

On XLA:CPU host offload moves nothing (both offload rows keep their values on
device); run on a GPU for the real offload comparison.

    python experiments/bench_peers.py [--depth 12 --width 128 --batch 4 --seq-len 128 --rounds 7]
                                      [--pairs linen nnx]   # a subset, by the first word of its name
"""

from __future__ import annotations

import argparse
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import remat
from remat import segmenters as S
from remat_bench import tradeoff
from remat_bench.models import linen as mlinen
from remat_bench.models import nnx as mnnx


def mse(y):
  return jnp.mean(y.astype(jnp.float32) ** 2)


def per_block_steps(a):
  block = mlinen.TransformerBlock(a.width, a.heads, dropout_rate=0.1)
  x = jax.random.normal(jax.random.key(0), (a.batch, a.seq_len, a.width))
  params = [block.init(jax.random.key(i), x[:1], False) for i in range(a.depth)]

  def make(wrap, **kw):
    f = wrap(lambda p, x, k: block.apply(p, x, True, rngs={"dropout": k}), **kw)

    def loss(ps, x, key):
      for i, p in enumerate(ps):
        x = f(p, x, jax.random.fold_in(key, i))
      return mse(x)
    return jax.value_and_grad(loss)

  off_ours = dict(policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  offload=remat.offload.host(argnums=1))
  off_jax = dict(policy=jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"))
  args = (params, x, jax.random.key(1))
  return {"per block": (make(remat.checkpoint), make(jax.checkpoint), args),
          "offload": (make(remat.checkpoint, **off_ours), make(jax.checkpoint, **off_jax), args)}


def linen_steps(a):
  tokens = jax.random.randint(jax.random.key(0), (a.batch, a.seq_len), 0, 96)

  def make(wrapper):
    model = mlinen.TransformerLM(seq_len=a.seq_len, depth=a.depth, width=a.width, heads=a.heads,
                                 block_wrapper=wrapper)
    return model, jax.value_and_grad(
        lambda v, t, k: mse(model.apply(v, t, True, rngs={"dropout": k})))

  model, ours = make(lambda c: remat.linen.checkpoint(c, static_argnums=(2,)))
  _, peer = make(lambda c: nn.remat(c, static_argnums=(2,)))
  v = model.init(jax.random.key(1), tokens, False)
  return {"linen": (ours, peer, (v, tokens, jax.random.key(2)))}


def nnx_steps(a):
  tokens = jax.random.randint(jax.random.key(0), (a.batch, a.seq_len), 0, 96)

  def make(wrapper):
    model = mnnx.TransformerLM(seq_len=a.seq_len, depth=a.depth, width=a.width, heads=a.heads,
                               block_wrapper=wrapper, rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, rest, t):
      m = nnx.merge(graphdef, params, rest)
      # nnx.Dropout is active unless the model is put in eval mode.
      return nnx.value_and_grad(lambda m: mse(m(t)))(m)
    return step, (params, rest)

  ours, state = make(remat.nnx.checkpoint)
  peer, _ = make(nnx.remat)
  return {"nnx": (ours, peer, (*state, tokens))}


def scan_steps(a):
  k = max(d for d in range(1, a.depth + 1) if a.depth % d == 0 and d <= math.isqrt(a.depth))
  block = mlinen.TransformerBlock(a.width, a.heads, dropout_rate=0.0)
  x = jax.random.normal(jax.random.key(0), (a.batch, a.seq_len, a.width))
  p1 = block.init(jax.random.key(1), x[:1], False)
  stacked = jax.tree_util.tree_map(lambda t: jnp.stack([t] * a.depth), p1)
  apply = remat.sequential(lambda p, x: block.apply(p, x, False), S.every(k))
  ours = jax.value_and_grad(lambda ps, x: mse(apply(ps, x)))

  class Body(nn.Module):
    @nn.compact
    def __call__(self, x):
      return mlinen.TransformerBlock(a.width, a.heads, dropout_rate=0.0, name="block")(x, False)

  stack = nn.remat_scan(Body, lengths=(a.depth // k, k))()
  v = stack.init(jax.random.key(1), x[:1])
  peer = jax.value_and_grad(lambda v, x: mse(stack.apply(v, x)))
  return {f"scanned stack (every({k}) / remat_scan)": (ours, peer, None, (stacked, x), (v, x))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--depth", type=int, default=12)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--pairs", nargs="*", default=None,
                  help="run only these pairs: per, offload, linen, nnx, scanned (default: all)")
  a = ap.parse_args(argv)

  pairs = {}
  for make in (per_block_steps, linen_steps, nnx_steps, scan_steps):
    pairs.update(make(a))
  if a.pairs:
    pairs = {name: spec for name, spec in pairs.items() if name.split()[0] in a.pairs}
  env = tradeoff.environment()
  rows = []
  bar = tradeoff.make_progress(len(pairs))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", remat.offload.OffloadNotExecutedWarning)
    for name, spec in pairs.items():
      bar.set_description(name)
      if len(spec) == 3:
        ours, peer, args = spec
        ours_args = peer_args = args
      else:
        ours, peer, _, ours_args, peer_args = spec
      f_ours, f_peer = remat.jit(ours), remat.jit(peer)
      p_ours, p_peer = remat.profile(f_ours, *ours_args), remat.profile(f_peer, *peer_args)
      t = tradeoff.interleaved_medians({"ours": lambda f=f_ours, x=ours_args: f(*x),
                                        "peer": lambda f=f_peer, x=peer_args: f(*x)}, rounds=a.rounds)
      rows.append([name, f"{p_ours.temp_bytes / 2**20:,.1f} / {p_peer.temp_bytes / 2**20:,.1f} MiB",
                   f"{p_ours.temp_bytes / p_peer.temp_bytes:.3f}", f"{p_ours.flops / p_peer.flops:.3f}",
                   f"{t['ours'] * 1e3:.1f} / {t['peer'] * 1e3:.1f} ms", f"{t['ours'] / t['peer']:.3f}"])
      bar.update(1)
  bar.close()
  print(f"\n{a.depth} transformer blocks, width {a.width}, batch {a.batch}, seq {a.seq_len}, dropout 0.1 "
        f"(scan: 0.0) on {env['backend']} ({env['device_kind']}), jax {env['jax']}, "
        f"{a.rounds} interleaved rounds\n")
  print(tradeoff.markdown_table(["pair (ours / peer)", "temp", "memory ratio", "flops ratio",
                                 "median step", "time ratio"], rows))


if __name__ == "__main__":
  main()
