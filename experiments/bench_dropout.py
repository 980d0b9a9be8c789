"""Per-block checkpoints with dropout: ours against ``nn.remat`` / ``nnx.remat``, one process.

Random bits depend on the key alone, so XLA:CPU may generate the dropout bits
of every checkpointed block at the start of the step and keep them all alive
(docs/facts.md, fact 11). ``remat.linen.checkpoint`` and
``remat.nnx.checkpoint`` pass each block's PRNG keys (NNX: key and count)
through one ``optimization_barrier`` together with the block's inputs, so the
bits of a block can only be made when the block runs; ``nn.remat`` and
``nnx.remat`` do not.

The model is ``remat_bench.models.linen`` / ``nnx`` ``TransformerLM`` with dropout on
embeddings, attention probabilities and residuals, checkpointed per block
through ``block_wrapper``. Every variant's step (``value_and_grad`` of a mean
square loss) is compiled with ``remat.jit`` (on CPU the option that keeps
rematerialization, for the peers too). Memory and flops come from the compiled
step (``remat.profile``); times are medians of interleaved runs (all variants
in one round-robin), so ratios are against the peer in the same process.

    python experiments/bench_dropout.py [--depth 8 --width 128 --batch 4 --seq-len 256 --rounds 9]
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import remat
from remat_bench import tradeoff
from remat_bench.models import linen as mlinen
from remat_bench.models import nnx as mnnx

VOCAB = 96


def mse(y):
  return jnp.mean(y.astype(jnp.float32) ** 2)


def linen_step(a, wrapper):
  model = mlinen.TransformerLM(vocab=VOCAB, seq_len=a.seq_len, depth=a.depth, width=a.width,
                               heads=a.heads, dropout_rate=a.dropout, block_wrapper=wrapper)
  tokens = jax.random.randint(jax.random.key(0), (a.batch, a.seq_len), 0, VOCAB)
  v = jax.jit(model.init)(jax.random.key(1), tokens)
  step = jax.value_and_grad(lambda v, t, k: mse(model.apply(v, t, True, rngs={"dropout": k})))
  return step, (v, tokens, jax.random.key(2))


def nnx_step(a, wrapper):
  model = mnnx.TransformerLM(vocab=VOCAB, seq_len=a.seq_len, depth=a.depth, width=a.width,
                             heads=a.heads, dropout_rate=a.dropout, block_wrapper=wrapper,
                             rngs=nnx.Rngs(params=1, dropout=2))
  tokens = jax.random.randint(jax.random.key(0), (a.batch, a.seq_len), 0, VOCAB)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(params, rest, t):
    m = nnx.merge(graphdef, params, rest)  # nnx.Dropout is active (train mode)
    return nnx.value_and_grad(lambda m: mse(m(t)))(m)

  return step, (params, rest, tokens)


# name -> (flavour, wrapper, peer name or None)
VARIANTS = {
    "linen plain": ("linen", None, None),
    "flax.linen.remat": ("linen", functools.partial(nn.remat, static_argnums=(2,)), None),
    "remat.linen.checkpoint": ("linen", functools.partial(remat.linen.checkpoint, static_argnums=(2,)),
                               "flax.linen.remat"),
    "nnx plain": ("nnx", None, None),
    "flax.nnx.remat": ("nnx", nnx.remat, None),
    "remat.nnx.checkpoint": ("nnx", remat.nnx.checkpoint, "flax.nnx.remat"),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--depth", type=int, default=8)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--dropout", type=float, default=0.1)
  ap.add_argument("--rounds", type=int, default=9)
  a = ap.parse_args(argv)

  profiles, thunks = {}, {}
  bar = tradeoff.make_progress(len(VARIANTS))
  for name, (flavour, wrapper, _) in VARIANTS.items():
    bar.set_description(name)
    step, args = (linen_step if flavour == "linen" else nnx_step)(a, wrapper)
    f = remat.jit(step)
    profiles[name] = remat.profile(f, *args)
    thunks[name] = functools.partial(f, *args)
    bar.update(1)
  bar.close()
  times = tradeoff.interleaved_medians(thunks, rounds=a.rounds)

  rows = []
  for name, (flavour, _, peer) in VARIANTS.items():
    p, t = profiles[name], times[name]
    plain = profiles[f"{flavour} plain"]
    if peer is None:
      ratios = ["", "", ""]
    else:
      q = profiles[peer]
      ratios = [f"{p.temp_bytes / q.temp_bytes:.3f}", f"{p.flops / q.flops:.3f}", f"{t / times[peer]:.3f}"]
    rows.append([name, f"{p.temp_bytes / 2**20:,.1f} MiB", f"{p.temp_bytes / plain.temp_bytes:.3f}",
                 f"{p.flops / 1e9:.2f}", f"{t * 1e3:.1f} ms", *ratios])
  env = tradeoff.environment()
  print(f"\nTransformerLM, {a.depth} blocks checkpointed per block, width {a.width}, heads {a.heads}, "
        f"batch {a.batch}, seq {a.seq_len}, dropout {a.dropout}, on {env['backend']} "
        f"({env['device_kind']}), jax {env['jax']}, {a.rounds} interleaved rounds\n")
  print(tradeoff.markdown_table(
      ["variant", "temp", "temp / plain", "GFLOP", "median step", "memory ratio (ours / peer)",
       "flops ratio", "time ratio"], rows))


if __name__ == "__main__":
  main()
