"""remat_bench: what remat's experiments, tests and notebooks measure, kept out of the remat wheel.

* ``remat_bench.models``: reference Flax models (linen and NNX) and a small text corpus;
* ``remat_bench.chains``: the reference chains of the command line (``mlp``, ``transformer``);
* ``remat_bench.tradeoff``: the founding table, measured (``remat compare``,
  ``experiments/tradeoff.py``).

Install it from a clone beside remat: ``pip install -e . -e bench``.
"""
