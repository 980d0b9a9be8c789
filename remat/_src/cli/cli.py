"""``python -m remat`` / ``remat``: plan checkpointing for a model, or measure the trade-off.

  remat plan     --model transformer --depth 24 --segmenter budget --budget 64MiB
  remat plan     --model examples/my_model.py:model --segmenter budget:256MiB
  remat fit      --model transformer --memory 2GiB
  remat compare  --model mlp --depths 4 8 16 32 --out results

A bad option prints one line (the flag, the value and the fix) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from remat._src.cli.cli_util import (OneLineParser, bench_module, make_progress, markdown_table, positive_int,
                                 positive_number, size_arg)
from remat._src.util.units import format_bytes, parse_bytes

MEMORY_COUNTS = (
    "A memory is per device and counts the whole compiled training step: the parameters, the "
    "optimizer state (Adam's two moments), the batch, the gradients and every temporary "
    "(Profile.peak_bytes: arguments + outputs + temporaries - donated buffers).")

BUDGET_COUNTS = (
    "A budget bounds the compiled temp memory of the chain's reference training step (the loss and "
    "gradients of the chain): activations, residuals and working buffers; not parameters, optimizer "
    "state, inputs or gradients, which live in argument and output buffers. To fit a whole step "
    "(parameters and optimizer state included) to a device, use `remat fit --memory`.")

__all__ = ["BUDGET_COUNTS", "MEMORY_COUNTS", "build_parser", "main", "parse_segmenter", "segmenter_label"]


### Arguments


def parse_segmenter(text: str, budget_bytes: int | None = None):
  """``"sqrt"``, ``"none"``, ``"every:4"``, ``"multilevel:2"``, ``"revolve:3"``, ``"budget[:2GiB]"``.

  Args:
    text: the segmenter as written on the command line.
    budget_bytes: the size for a bare ``budget`` (from ``--budget``).

  Raises:
    ValueError: with a one-line message that says the accepted forms.

  Example:

    >>> from remat._src.cli.cli import parse_segmenter
    >>> parse_segmenter("revolve:3"), parse_segmenter("budget:1MiB")
    (revolve(slots=3), budget(1048576))
  """
  from remat import segmenters as S

  name, colon, arg = str(text).partition(":")
  forms = "sqrt, none, every:K, multilevel:L, revolve:S or budget:SIZE"
  if name in ("sqrt", "none"):
    if colon:
      raise ValueError(f"`{name}` takes no argument; write `{name}`.")
    return S.sqrt() if name == "sqrt" else S.none()
  counts = {"every": ("layers per segment", "every:4", None), "multilevel": ("levels", "multilevel:2", 2),
            "revolve": ("stored states", "revolve:3", None)}
  if name in counts:
    what, example, default = counts[name]
    if not arg and default is not None:
      return S.multilevel(default)
    try:
      n = int(arg)
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(f"`{name}` needs a whole number >= 1 of {what}, but got {arg!r}; e.g. `{example}`.")
    return {"every": S.every, "multilevel": S.multilevel, "revolve": S.revolve}[name](n)
  if name == "budget":
    b = parse_bytes(arg) if arg else budget_bytes
    if b is None:
      raise ValueError("`budget` needs a size: `--segmenter budget:2GiB`, or "
                       "`--segmenter budget --budget 2GiB`.")
    return S.budget(b)
  raise ValueError(f"unknown segmenter {text!r}; use {forms}.")


def segmenter_label(seg) -> str:
  """``budget(64.00 MiB)`` rather than ``budget(max_bytes=67108864, ...)``; others as ``repr``."""
  max_bytes = getattr(seg, "max_bytes", None)
  return f"budget({format_bytes(max_bytes)})" if max_bytes is not None else repr(seg)


### Commands


def build_parser() -> argparse.ArgumentParser:
  from remat._src.cli.cli_model import CONTRACT

  ap = OneLineParser(
      prog="remat", description="Activation checkpointing for JAX and Flax: plan where to checkpoint a "
      "model and measure the memory/compute trade-off from the compiled program.",
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  sub = ap.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

  p = sub.add_parser(
      "plan", help="print the plan a segmenter makes, with predicted and compiled costs",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_wrap("Make a checkpointing plan for a chain of layers (a reference model or your own) "
                        "and check it by compiling its training step: prints the nested segments, then "
                        "the predicted and compiled temp memory and flops next to plain backprop's. "
                        "Size flags set the reference models' sizes, and are passed as keywords to a "
                        "factory of yours that takes them.") + "\n\n" + _wrap(BUDGET_COUNTS),
      epilog=CONTRACT)
  _model_args(p)
  p.add_argument("--segmenter", default="sqrt",
                 help="sqrt | none | every:K | multilevel:L | revolve:S | budget:SIZE (default sqrt)")
  p.add_argument("--budget", type=size_arg, default=None,
                 help="the size for --segmenter budget, e.g. 2GiB or 64MiB: a bound on the compiled temp "
                 "memory of the chain's training step (see above)")
  p.add_argument("--no-progress", action="store_true", help="plain lines instead of a progress bar")

  f = sub.add_parser(
      "fit", help="fit a whole training step to a device memory: the plan, the largest batch and length",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_wrap("Fit the model's whole training step (parameters, Adam state, batch, gradients "
                        "and activations) to --memory per device with remat.fit and an auto() chain: "
                        "print the chosen plan with the compiled numbers, then the largest batch (and, "
                        "where the model takes --seq-len, the largest sequence length) that fits, "
                        "against plain backprop.") + "\n\n" + _wrap(MEMORY_COUNTS),
      epilog=CONTRACT)
  _model_args(f)
  f.add_argument("--memory", type=size_arg, required=True,
                 help="memory per device, e.g. 16GiB or 80GB (see above)")
  f.add_argument("--no-search", action="store_true",
                 help="fit the given sizes only; skip the search for the largest batch and sequence length")
  f.add_argument("--max-time", type=positive_number("--max-time", "600"), default=600.0,
                 help="seconds the search for the largest sizes may take (default 600); when it runs "
                 "out, or on Ctrl-C, what was found so far is printed")
  f.add_argument("--no-progress", action="store_true", help="plain lines instead of progress lines")

  c = sub.add_parser("compare", help="measure the memory/compute table of every method",
                     description="Compile and run every method (standard, forward_only, no_storage, "
                     "checkpoint_sqrt, multilevel, revolve, budget, offload) on a reference chain "
                     "for a sweep of depths; print the founding table with measured numbers, write "
                     "tradeoff.csv and plots (the same code as experiments/tradeoff.py; needs the "
                     "repository's benchmark package: pip install -e . -e bench). "
                     "`remat compare --help` lists its options.")
  del c  # its arguments are parsed by remat_bench.tradeoff (see `main`)
  ap.subcommands = {"plan": p, "fit": f}  # their one-line errors name `remat plan` / `remat fit`
  return ap


def _model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="transformer",
                 help="mlp | transformer (reference chains) | package.module:factory | "
                 "path/to/file.py:factory (your own model, see below; default transformer)")
  p.add_argument("--depth", type=positive_int("--depth", "12"), default=None,
                 help="number of layers/blocks (default 12)")
  p.add_argument("--width", type=positive_int("--width", "256"), default=None,
                 help="features per layer (default 256)")
  p.add_argument("--batch", type=positive_int("--batch", "8"), default=None,
                 help="batch size (default 8 transformer, 512 mlp)")
  p.add_argument("--seq-len", type=positive_int("--seq-len", "128"), default=None,
                 help="sequence length, transformer (default 128)")
  p.add_argument("--heads", type=positive_int("--heads", "4"), default=None,
                 help="attention heads, transformer (default 4; must divide --width)")


def _wrap(text: str, width: int = 88) -> str:
  import textwrap

  return textwrap.fill(text, width)


def cmd_plan(args, ap: argparse.ArgumentParser) -> int:
  import jax

  from remat._src.measure import costs as costs_lib
  from remat._src.measure import profile
  from remat._src.cli.cli_model import ModelError, load_model
  from remat._src.plans.plan import Segment, make_plan

  seg = _segmenter(args, ap)
  sizes = {k: getattr(args, k) for k in ("depth", "width", "batch", "seq_len", "heads")}
  try:
    model = load_model(args.model, **sizes)
  except ModelError as e:
    value = args.model if e.flag == "--model" else getattr(args, e.flag[2:].replace("-", "_"))
    ap.error(f"argument {e.flag} {value}: {e}")
  specs = model.specs()
  label = segmenter_label(seg)
  bar = make_progress(3, not args.no_progress)
  bar.set_description("compiling plain backprop")
  plain = profile.profile(model.step(), *specs)
  bar.update(1)
  bar.set_description(f"planning {label}")
  try:
    plan = model.plan(seg)
  except ValueError as e:  # an infeasible budget: the message says the smallest one that fits
    if getattr(seg, "max_bytes", None) is None:
      raise
    bar.close()
    flag = "--budget" if args.budget is not None else "--segmenter"
    ap.error(f"argument {flag} {args.budget_text or args.segmenter}: {e}")
  costs = costs_lib.measure_costs(model.layers, *specs)  # cached: measured once per distinct layer
  if plan.predicted_peak_bytes is None:
    plan = make_plan(plan.root, costs, plan.num_layers, plan.made_by)
  plain_plan = make_plan(Segment(0, model.depth), costs, model.depth, "plain")
  bar.update(1)
  bar.set_description("compiling the plan")
  planned = profile.profile(model.step(plan), *specs)
  bar.update(1)
  bar.close()

  act = model.activation_bytes
  size = lambda b: f"{format_bytes(b)} ({b / act:,.1f} act)" if b is not None else "n/a"  # noqa: E731
  gflop = lambda f: f"{f / 1e9:,.3f}" if f is not None else "n/a"  # noqa: E731
  print(f"\n{model.description} on {jax.default_backend()}; one activation (the chain's input) = "
        f"{format_bytes(act)}\n")
  print(f"Plan {label}, {plan.num_layers} layers: {plan.forward_evaluations} layer forward evaluations "
        f"({plan.recomputation()}), {plan.stored_states} stored states")
  print("\n".join(plan.root.lines(1)))
  print()
  rows = [["plain backprop", size(plain.temp_bytes), size(plain_plan.predicted_peak_bytes),
           gflop(plain.flops), gflop(plain_plan.predicted_flops), model.depth],
          [label, size(planned.temp_bytes), size(plan.predicted_peak_bytes), gflop(planned.flops),
           gflop(plan.predicted_flops), plan.forward_evaluations]]
  print(markdown_table(["schedule", "compiled temp", "predicted temp", "compiled GFLOP",
                        "predicted GFLOP", "layer forward evaluations"], rows))
  print(f"\ncompiled: memory {planned.temp_bytes / max(plain.temp_bytes, 1):.2f}x plain, "
        f"flops {planned.flops / plain.flops:.2f}x plain.")
  if getattr(seg, "max_bytes", None) is not None:
    verdict = "fits" if planned.temp_bytes <= seg.max_bytes else "DOES NOT FIT"
    print(f"budget {format_bytes(seg.max_bytes)}: the plan compiles to {format_bytes(planned.temp_bytes)}: "
          f"{verdict}.")
  print(f"Temp memory counts activations, residuals and working buffers of the chain's training step; "
        f"not parameters ({format_bytes(plain.argument_bytes)} of arguments here), optimizer state or "
        "gradients.")
  return 0


def _segmenter(args, ap):
  """The segmenter ``--segmenter`` and ``--budget`` describe; conflicting flags are refused."""
  name, _, arg = args.segmenter.partition(":")
  if args.budget is not None:
    if name != "budget":
      ap.error(f"argument --budget: applies to the budget segmenter, but --segmenter is {args.segmenter!r}; "
               "use --segmenter budget --budget SIZE.")
    if arg:
      ap.error(f"argument --budget {args.budget_text}: conflicts with --segmenter {args.segmenter}; "
               "give the size once: --segmenter budget:SIZE, or --segmenter budget --budget SIZE.")
  try:
    return parse_segmenter(args.segmenter, args.budget)
  except ValueError as e:
    ap.error(f"argument --segmenter {args.segmenter}: {e}")


def cmd_compare(argv) -> int:
  try:
    return bench_module("tradeoff").main(argv, prog="remat compare")
  except SystemExit as e:  # a bad option (one line printed, status 2), or --help (0)
    if isinstance(e.code, int) or e.code is None:
      return int(e.code or 0)
    raise


# Options that take a value which may start with "-" (a mistaken negative size):
# joined as --opt=value so that the value's own check reports it.
_VALUE_OPTIONS = ("--budget", "--segmenter", "--model", "--depth", "--width", "--batch", "--seq-len",
                  "--heads", "--memory")


def _join_dash_values(argv: list[str]) -> list[str]:
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a in _VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") \
       and not argv[i + 1].startswith("--"):
      out.append(f"{a}={argv[i + 1]}")
      i += 2
      continue
    out.append(a)
    i += 1
  return out


def _option_text(argv: list[str], option: str) -> str | None:
  """What the user wrote after ``option`` (the last time), for messages."""
  text = None
  for i, a in enumerate(argv):
    if a.startswith(option + "="):
      text = a.split("=", 1)[1]
    elif a == option and i + 1 < len(argv):
      text = argv[i + 1]
  return text


def main(argv=None) -> int:
  """Runs the command line; returns the exit status (2 for a bad option, after one line on stderr)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["compare"]:
    return cmd_compare(_join_dash_values(argv[1:]))
  argv = _join_dash_values(argv)
  ap = build_parser()
  commands = ("plan", "fit", "compare")
  if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    # argparse would only say that the command is missing; name the flag and the commands.
    first = next((a for a in argv if a in commands), None)
    where = f"before the command {first!r}" if first else "with no command"
    sys.stderr.write(f"remat: error: unrecognized argument {argv[0]!r} {where}. Usage: remat "
                     f"{{{','.join(commands)}}} [options]; `remat COMMAND --help` lists a command's "
                     "options.\n")
    return 2
  try:
    args = ap.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  args.budget_text = _option_text(argv, "--budget")
  try:
    if args.command == "fit":
      from remat._src.cli.cli_fit import cmd_fit

      return cmd_fit(args, ap.subcommands["fit"])
    return cmd_plan(args, ap.subcommands[args.command])
  except SystemExit as e:  # `parser.error`: one line printed, status 2
    if isinstance(e.code, int):
      return e.code
    raise
