"""The founding table, measured: memory and compute of every way to backpropagate.

For a sweep of depths of a reference chain (`tanh(x @ w)` layers by default, or
transformer blocks with dropout), each method's training step is compiled with
the options that keep rematerialization (`remat.compiler_options()`) and
measured:

  standard         plain backprop: every activation stored
  forward_only     inference: no backward pass, buffers reused
  no_storage       store only the chain input; recompute each layer's input from it
  checkpoint_sqrt  sqrt(D) segments: keep segment inputs, recompute inside
  multilevel       two nested levels of segments: O(D^(1/3)) stored states
  revolve          Griewank-Walther optimum for a few stored states
  budget           the planner, given checkpoint_sqrt's compiled memory as its budget
  offload          no matmul recomputed; saved values placed in host memory
                   (moves only where the backend executes memory kinds: GPU/TPU)

Writes `tradeoff.csv` (method, depth, peak_bytes, temp_bytes, host_temp_bytes,
flops, forward_evaluations, step_time_s, backend, device_kind) and three PNG
plots to `--out`, prints the founding table with measured numbers, and checks
the notes' claims (reported as measured, never tuned).

    python experiments/tradeoff.py --quick --out results
"""

from __future__ import annotations

import argparse
import os

from remat._src import chains, tradeoff


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--quick", action="store_true", help="small sweep (about a minute on 2 CPU cores)")
  ap.add_argument("--out", default="results", help="directory for tradeoff.csv and the plots")
  ap.add_argument("--model", choices=chains.MODELS, default="mlp")
  ap.add_argument("--depths", type=int, nargs="+", help="default 4 8 16 32 (quick) or 4 8 16 32 64")
  ap.add_argument("--batch", type=int, default=None, help="default 512 (mlp) or 8 (transformer)")
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=None, help="timed rounds per method (median)")
  ap.add_argument("--revolve-slots", type=int, default=3)
  ap.add_argument("--methods", nargs="+", choices=tradeoff.METHODS, default=list(tradeoff.METHODS))
  ap.add_argument("--no-progress", action="store_true", help="plain lines instead of a progress bar")
  args = ap.parse_args(argv)

  depths = args.depths or ([4, 8, 16, 32] if args.quick else [4, 8, 16, 32, 64])
  rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
  batch = args.batch or (512 if args.model == "mlp" else 8)
  methods = list(dict.fromkeys(["standard"] + list(args.methods)))
  sweep = [chains.Chain(model=args.model, depth=d, width=args.width, batch=batch, seq_len=args.seq_len)
           for d in depths]
  os.makedirs(args.out, exist_ok=True)
  rows = tradeoff.measure(sweep, methods, rounds=rounds, revolve_slots=args.revolve_slots,
                          progress=not args.no_progress)
  csv_path = os.path.join(args.out, "tradeoff.csv")
  tradeoff.write_csv(rows, csv_path)
  paths = tradeoff.plot(rows, args.out, sweep[0].activation_bytes)
  print("\nThe founding table, " + tradeoff.founding_table(rows, sweep[0].activation_bytes))
  print("\nClaims of the founding notes, checked against these measurements:")
  for text, ok in tradeoff.check_claims(rows):
    print(f"  [{'holds' if ok else 'DOES NOT HOLD'}] {text}")
  if rows[0]["backend"] == "cpu" and "offload" in methods:
    print("\nNote: XLA:CPU does not execute host offload (remat.offload.supported() is False), so the "
          "offload row keeps its values in device memory here; on a GPU/TPU they move to host "
          "(host_temp_bytes).")
  print(f"\nwrote {csv_path}, {', '.join(paths)}")
  return rows


if __name__ == "__main__":
  main()
