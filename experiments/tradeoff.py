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

Writes `tradeoff.csv` and three PNG plots to `--out`, prints the founding table
with measured numbers, and checks the notes' claims (reported as measured, never
tuned). The same code runs as `remat compare`.

    python experiments/tradeoff.py --quick --out results
"""

import sys

from remat_bench import tradeoff

if __name__ == "__main__":
  sys.exit(tradeoff.main(prog="experiments/tradeoff.py"))
