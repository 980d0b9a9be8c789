"""Train the reference transformer LM with and without per-block checkpointing.

Both models start from the same weights and see the same batches and the same
dropout keys; the script steps them in lock-step (interleaved, in one process)
and prints both loss curves, the compiled memory of both training steps
(``remat.profile``) and the step-time ratio. The data is the character corpus
shipped in ``remat/models/corpus.txt`` (no downloads).

Run (CPU, a few minutes):

  python experiments/train_lm.py                 # linen, 300 steps
  python experiments/train_lm.py --framework nnx --steps 200
  python experiments/train_lm.py --plot lm.png   # also save the curves
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import remat
from remat_bench.models import data
from remat_bench.models import linen as linen_models
from remat_bench.models import nnx as nnx_models


def xent(logits, targets):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()


def linen_trainer(args, checkpointed, tx, x0):
  wrapper = functools.partial(remat.linen.checkpoint, static_argnums=(2,)) if checkpointed else None
  model = linen_models.TransformerLM(
      vocab=data.VOCAB_SIZE, seq_len=args.seq_len, depth=args.depth, width=args.width,
      heads=args.heads, dropout_rate=args.dropout, block_wrapper=wrapper)
  params = jax.jit(model.init)(jax.random.key(args.seed), x0)["params"]

  def step(params, opt_state, x, y, key):
    loss, grads = jax.value_and_grad(
        lambda p: xent(model.apply({"params": p}, x, True, rngs={"dropout": key}), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, x, y):
    return xent(model.apply({"params": params}, x, False), y)

  return params, step, evaluate


def nnx_trainer(args, checkpointed, tx, x0):
  del x0
  model = nnx_models.TransformerLM(
      vocab=data.VOCAB_SIZE, seq_len=args.seq_len, depth=args.depth, width=args.width,
      heads=args.heads, dropout_rate=args.dropout,
      block_wrapper=remat.nnx.checkpoint if checkpointed else None,
      rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(state, opt_state, x, y, key):
    del key  # NNX draws dropout keys from the model's own Rngs stream (part of `rest`)
    params, rest = state
    model = nnx.merge(graphdef, params, rest)
    loss, grads = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), rest), opt_state, loss

  @jax.jit
  def evaluate(state, x, y):
    model = nnx.merge(graphdef, *state)
    model.eval()
    return xent(model(x), y)

  return (params, rest), step, evaluate


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--framework", choices=["linen", "nnx"], default="linen")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--print-every", type=int, default=25)
  p.add_argument("--plot", default=None, help="save the loss curves to this image file")
  args = p.parse_args(argv)

  tokens = data.encode(data.load_corpus())
  batches = data.lm_batches(args.batch, args.seq_len, seed=args.seed, tokens=tokens)
  valid = data.lm_batches(args.batch, args.seq_len, seed=args.seed + 1, split="valid", tokens=tokens)
  x0, _ = next(data.lm_batches(args.batch, args.seq_len, seed=99, tokens=tokens))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.warmup_cosine_decay_schedule(
                       0.0, args.lr, min(50, args.steps // 5 + 1), args.steps, args.lr / 10)))
  make = linen_trainer if args.framework == "linen" else nnx_trainer

  runs = {}
  for name, ck in (("plain", False), ("checkpointed", True)):
    state, step, evaluate = make(args, ck, tx, x0)
    opt_state = tx.init(state[0] if args.framework == "nnx" else state)
    key = jax.random.key(0)
    prof = remat.profile(step, state, opt_state, x0, x0, key)
    runs[name] = dict(state=state, opt=opt_state, step=remat.jit(step, donate_argnums=(0, 1)),
                      evaluate=evaluate, profile=prof, losses=[], times=[])

  print(f"TransformerLM ({args.framework}): depth {args.depth}, width {args.width}, heads "
        f"{args.heads}, seq {args.seq_len}, batch {args.batch}, dropout {args.dropout}, "
        f"{args.steps} steps of AdamW on {len(tokens):,} characters")
  for name, r in runs.items():
    print(f"  {name:>12}: {r['profile']}")
  plain_p, ck_p = runs["plain"]["profile"], runs["checkpointed"]["profile"]
  print(f"  checkpointed / plain: temp {ck_p.temp_bytes / plain_p.temp_bytes:.3f}, "
        f"peak {ck_p.peak_bytes / plain_p.peak_bytes:.3f}, flops {ck_p.flops / plain_p.flops:.3f}")

  print(f"\n{'step':>6} {'plain loss':>12} {'ckpt loss':>12} {'|diff|':>10}")
  for i in range(args.steps):
    x, y = next(batches)
    key = jax.random.key(1000 + i)
    order = ("plain", "checkpointed") if i % 2 == 0 else ("checkpointed", "plain")
    for name in order:  # interleave, so both see the same machine load
      r = runs[name]
      t0 = time.perf_counter()
      r["state"], r["opt"], loss = r["step"](r["state"], r["opt"], x, y, key)
      loss = float(loss)
      r["times"].append(time.perf_counter() - t0)
      r["losses"].append(loss)
    if i % args.print_every == 0 or i == args.steps - 1:
      a, b = runs["plain"]["losses"][-1], runs["checkpointed"]["losses"][-1]
      print(f"{i:>6} {a:>12.5f} {b:>12.5f} {abs(a - b):>10.2e}")

  la, lb = np.array(runs["plain"]["losses"]), np.array(runs["checkpointed"]["losses"])
  xv, yv = next(valid)
  va = float(runs["plain"]["evaluate"](runs["plain"]["state"], xv, yv))
  vb = float(runs["checkpointed"]["evaluate"](runs["checkpointed"]["state"], xv, yv))
  ta = np.median(runs["plain"]["times"][1:])
  tb = np.median(runs["checkpointed"]["times"][1:])
  print(f"\nmax |loss difference| over {args.steps} steps: {np.max(np.abs(la - lb)):.2e} "
        f"(relative {np.max(np.abs(la - lb) / np.abs(la)):.2e})")
  print(f"final train loss: plain {la[-1]:.4f}, checkpointed {lb[-1]:.4f} (from {la[0]:.4f}); "
        f"valid loss: plain {va:.4f}, checkpointed {vb:.4f}")
  print(f"peak memory of the compiled step: plain {plain_p.peak_bytes / 2**20:.2f} MiB, "
        f"checkpointed {ck_p.peak_bytes / 2**20:.2f} MiB (temp {plain_p.temp_bytes / 2**20:.2f} -> "
        f"{ck_p.temp_bytes / 2**20:.2f} MiB)")
  print(f"median step time: plain {ta * 1e3:.1f} ms, checkpointed {tb * 1e3:.1f} ms "
        f"(ratio {tb / ta:.2f})")

  if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(la, label=f"plain (peak {plain_p.peak_bytes / 2**20:.1f} MiB)")
    ax.plot(lb, "--", label=f"remat.{args.framework}.checkpoint (peak {ck_p.peak_bytes / 2**20:.1f} MiB)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/char)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"saved {args.plot}")
  return la, lb


if __name__ == "__main__":
  main()
