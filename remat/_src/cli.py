"""``python -m remat`` / ``remat``: plan checkpointing for a model, or measure the trade-off.

  remat plan     --model transformer --depth 24 --segmenter budget --budget 64MiB
  remat compare  --model mlp --depths 4 8 16 32 --out results
"""

from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
          "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
  """``"2GiB"`` -> 2147483648; accepts B, kB/MB/GB (powers of 10) and KiB/MiB/GiB (powers of 2).

  Raises:
    argparse.ArgumentTypeError: for anything else, with the accepted forms.
  """
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise argparse.ArgumentTypeError(
        f"cannot read {text!r} as a size in bytes; write e.g. 2GiB, 512MiB, 1.5GB or 1e9.")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_segmenter(text: str, budget_bytes: int | None = None):
  """``"sqrt"``, ``"every:4"``, ``"multilevel:2"``, ``"revolve:3"``, ``"none"``, ``"budget[:2GiB]"``."""
  from remat import segmenters as S

  name, _, arg = text.partition(":")
  try:
    if name == "sqrt" and not arg:
      return S.sqrt()
    if name == "none" and not arg:
      return S.none()
    if name == "every":
      return S.every(int(arg))
    if name == "multilevel":
      return S.multilevel(int(arg or 2))
    if name == "revolve":
      return S.revolve(int(arg))
    if name == "budget":
      b = parse_bytes(arg) if arg else budget_bytes
      if b is None:
        raise argparse.ArgumentTypeError("`budget` needs a size: --segmenter budget:2GiB or --budget 2GiB.")
      return S.budget(b)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"bad segmenter {text!r}: {e}") from None
  raise argparse.ArgumentTypeError(
      f"unknown segmenter {text!r}; use sqrt, none, every:K, multilevel:L, revolve:S or budget:SIZE.")


def _bench(module: str):
  """A module of the repository's benchmark package, which the remat wheel does not ship."""
  import importlib

  try:
    return importlib.import_module(f"remat_bench.{module}")
  except ImportError as e:
    raise SystemExit(
        f"remat: error: the reference models and the trade-off measurement live in the repository's "
        f"benchmark package `remat_bench`, which is not installed ({e}). From a clone of remat: "
        "`pip install -e . -e bench`.") from None


def _chain_args(p: argparse.ArgumentParser, *, depth: bool = True):
  p.add_argument("--model", choices=("mlp", "transformer"), default="transformer",
                 help="reference chain: tanh(x @ w) layers or transformer blocks (default: transformer)")
  if depth:
    p.add_argument("--depth", type=int, default=12, help="number of layers/blocks (default 12)")
  p.add_argument("--width", type=int, default=256, help="features per layer (default 256)")
  p.add_argument("--batch", type=int, default=None, help="batch size (default 8 transformer, 512 mlp)")
  p.add_argument("--seq-len", type=int, default=128, help="sequence length, transformer (default 128)")
  p.add_argument("--heads", type=int, default=4, help="attention heads, transformer (default 4)")


def _chain(args, depth):
  chains = _bench("chains")
  batch = args.batch or (512 if args.model == "mlp" else 8)
  return chains.Chain(model=args.model, depth=depth, width=args.width, batch=batch,
                      seq_len=args.seq_len, heads=args.heads)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="remat", description="Activation checkpointing for JAX and Flax: plan where to checkpoint a "
      "model and measure the memory/compute trade-off from the compiled program.",
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  sub = ap.add_subparsers(dest="command", required=True)

  p = sub.add_parser("plan", help="print the plan a segmenter makes, with predicted and compiled costs",
                     description="Make a checkpointing plan for a reference model and check it by "
                     "compiling the training step: prints the nested segments, the predicted temp "
                     "memory and flops, and the compiled ones next to plain backprop's.")
  _chain_args(p)
  p.add_argument("--segmenter", default="sqrt",
                 help="sqrt | none | every:K | multilevel:L | revolve:S | budget:SIZE (default sqrt)")
  p.add_argument("--budget", type=parse_bytes, default=None,
                 help="memory budget for --segmenter budget, e.g. 2GiB or 64MiB")
  p.add_argument("--no-progress", action="store_true")

  c = sub.add_parser("compare", help="measure the memory/compute table of every method",
                     description="Compile and run every method (standard, forward_only, no_storage, "
                     "checkpoint_sqrt, multilevel, revolve, budget, offload) on a reference chain "
                     "for a sweep of depths; print the founding table with measured numbers, write "
                     "tradeoff.csv and plots (the same code as experiments/tradeoff.py; needs the "
                     "repository's benchmark package: pip install -e . -e bench). "
                     "`remat compare --help` lists its options.")
  del c  # its arguments are parsed by remat_bench.tradeoff (see `main`)
  return ap


def cmd_plan(args) -> int:
  import jax

  from remat._src import profile, sequential

  chains, tradeoff = _bench("chains"), _bench("tradeoff")

  try:
    if args.budget is not None and not args.segmenter.startswith("budget"):
      raise argparse.ArgumentTypeError(
          f"--budget applies to the budget segmenter, but --segmenter is {args.segmenter!r}; "
          "use --segmenter budget --budget SIZE.")
    seg = parse_segmenter(args.segmenter, args.budget)
  except argparse.ArgumentTypeError as e:
    print(f"remat plan: error: {e}", file=sys.stderr)
    return 2
  chain = _chain(args, args.depth)
  specs = chain.specs()
  bar = tradeoff.make_progress(3, not args.no_progress)
  bar.set_description("plain backprop")
  plain = profile.profile(jax.value_and_grad(lambda ps, x, k: chains.mean_square(chain.chain_fn()(ps, x, k))),
                          *specs)
  bar.update(1)
  bar.set_description(f"planning {seg!r}")
  try:
    plan = sequential.chain_plan(chain.layers, seg, *specs, compile=True)
  except ValueError as e:
    bar.close()
    print(f"remat plan: {e}", file=sys.stderr)
    return 1
  bar.update(1)
  bar.set_description("compiling the plan")
  apply = sequential.sequential(chain.layers, plan)
  planned = profile.profile(jax.value_and_grad(lambda ps, x, k: chains.mean_square(apply(ps, x, k))), *specs)
  bar.update(1)
  bar.close()
  act = chain.activation_bytes
  mib = lambda b: f"{b / 2**20:,.2f} MiB ({b / act:.1f} activations)"
  print(f"\n{chain.model}: depth {chain.depth}, width {chain.width}, batch {chain.batch}"
        + (f", seq_len {chain.seq_len}" if chain.model == "transformer" else "")
        + f" on {jax.default_backend()}\n")
  print(plan)
  print()
  rows = [["plain backprop", mib(plain.temp_bytes), "", f"{plain.flops / 1e9:,.3f}", chain.depth],
          [repr(seg), mib(planned.temp_bytes),
           mib(plan.predicted_peak_bytes) if plan.predicted_peak_bytes is not None else "n/a",
           f"{planned.flops / 1e9:,.3f}" + (f" (predicted {plan.predicted_flops / 1e9:,.3f})"
                                            if plan.predicted_flops else ""),
           plan.forward_evaluations]]
  print(tradeoff.markdown_table(["schedule", "compiled temp", "predicted temp", "GFLOP / step",
                                 "layer forward evaluations"], rows))
  print(f"\nmemory {planned.temp_bytes / max(plain.temp_bytes, 1):.2f}x plain, "
        f"flops {planned.flops / plain.flops:.2f}x plain")
  return 0


def cmd_compare(argv) -> int:
  return _bench("tradeoff").main(argv, prog="remat compare")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["compare"]:
    return cmd_compare(argv[1:])
  args = build_parser().parse_args(argv)
  return {"plan": cmd_plan}[args.command](args)
