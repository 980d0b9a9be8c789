"""The README's code runs as written, and does what the text around it says.

Every ```python block is executed exactly as written (each in a fresh namespace); blocks that
define something the text makes claims about are checked further here (gradients, memory). The
`remat plan` command lines of the README are run too.
"""

import pathlib
import re
import shlex

import jax
import pytest

import remat
from remat._src.cli import cli
from remat._src.util import compat
from remat._src.cli.cli_model import from_dict
from tests.exactness import assert_same_gradients

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
PLAN_COMMANDS = re.findall(r"^\.venv/bin/remat (plan .*)$", README, re.M)


def _block(marker: str) -> str:
  found = [b for b in BLOCKS if marker in b]
  assert len(found) == 1, f"expected one README block with {marker!r}"
  return found[0]


def _run(src: str) -> dict:
  ns: dict = {}
  exec(compile(src, "README block", "exec"), ns)
  return ns


def _temp(compiled) -> int:
  return compiled.memory_analysis().temp_size_in_bytes


def test_readme_has_examples_and_the_two_commands():
  assert len(BLOCKS) >= 5
  assert "experiments/tradeoff.py --quick" in README and "pytest" in README
  assert "REMAT_NO_XLA_FLAGS" not in README and "import remat` changes nothing" in README  # fact 24
  assert len(PLAN_COMMANDS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
  _run(BLOCKS[i])


def test_flax_example_gradients_match_the_plain_model_and_save_memory():
  src = _block("CkptBlock = remat.linen.checkpoint")
  ns = _run(src)
  plain = _run(src.replace("x = CkptBlock()(x, train)", "x = Block()(x, train)"))
  key = jax.random.key(1)
  # Same parameter tree, and the recomputation draws the same dropout masks: equal gradients.
  assert jax.tree.structure(ns["params"]) == jax.tree.structure(plain["params"])
  want = remat.jit(jax.grad(plain["loss"]))(ns["params"], key)
  assert_same_gradients(ns["grads"], want)  # bit for bit on jax 0.10, as the text says
  # Under remat.jit, as the example compiles it (the text: 11.3 MiB against 22.0 MiB) ...
  pl = _temp(jax.jit(jax.grad(plain["loss"])).lower(plain["params"], key).compile())
  ck = _temp(remat.jit(jax.grad(ns["loss"])).lower(ns["params"], key).compile())
  assert ck <= 0.6 * pl, (ck, pl)
  # ... and under plain jax.jit as the table of "On CPU" says for the installed jax.
  ck_plain_jit = _temp(jax.jit(jax.grad(ns["loss"])).lower(ns["params"], key).compile())
  if compat.CPU_UNDOES_REMAT:
    assert ck_plain_jit >= 0.9 * pl, (ck_plain_jit, pl)
  else:
    assert ck_plain_jit <= 0.6 * pl, (ck_plain_jit, pl)


def test_nnx_examples_save_memory_where_the_text_says():
  src = _block("@nnx.jit")
  ns = _run(src)
  plain = _run(src.replace("  @remat.nnx.checkpoint  # like nnx.remat\n", ""))
  assert "remat.nnx.checkpoint" not in plain["Block"].__call__.__qualname__
  temp = lambda n: _temp(n["train_step"].lower(n["model"], n["optimizer"], n["x"]).compile())  # noqa: E731
  if compat.CPU_UNDOES_REMAT:  # nnx.jit takes no options: XLA:CPU undoes the checkpoint (fact 1)
    assert temp(ns) >= 0.9 * temp(plain), (temp(ns), temp(plain))
  else:  # the text: 11.0 MiB against 21.8 MiB
    assert temp(ns) <= 0.6 * temp(plain), (temp(ns), temp(plain))


def test_planner_example_fits_its_budget():
  ns = _run(_block("S.budget(8 * 2**20)"))
  plan = ns["plan"]
  assert plan.compiled_temp_bytes <= 8 * 2**20 and plan.recomputes


def test_my_model_block_is_the_shipped_example_and_loads():
  src = _block('"args": (True,)')
  ns = _run(src)
  model = from_dict(ns["model"](depth=2, batch=2, seq_len=8, width=16), name="README")
  assert model.depth == 2
  # The block in the README is the one examples/my_model.py ships.
  shipped = (ROOT / "examples" / "my_model.py").read_text()
  assert "h = nn.Dropout(0.1, deterministic=not train)(nn.gelu(nn.Dense(4 * x.shape[-1])(x)))" in shipped
  assert '"args": (True,)' in shipped


@pytest.mark.parametrize("command", PLAN_COMMANDS)
def test_readme_plan_commands_run(command, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  assert cli.main(shlex.split(command) + ["--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "compiled temp" in out and "predicted temp" in out
  if "budget:" in command:
    assert ": fits." in out


def test_the_old_readme_mistake_gets_a_message_that_names_the_cause():
  # The README once put checkpointed blocks in nn.Sequential and applied it with `train`:
  # nn.Sequential passes `train` to the first block only.
  import flax.linen as nn
  import jax.numpy as jnp

  ns = _run(_block("CkptBlock = remat.linen.checkpoint"))
  model = nn.Sequential([ns["CkptBlock"]() for _ in range(2)])
  with pytest.raises(ValueError, match=r"passed only 2 positional arguments\. Pass that argument "
                     r"positionally\. If the module sits in `flax\.linen\.Sequential`, that is the cause"):
    model.init(jax.random.key(0), jnp.ones((2, 4)), True)


def _readme_tables():
  import importlib.util
  spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "experiments" / "readme_tables.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_founding_table_is_the_csv_of_the_main_job():
  tables = _readme_tables()
  assert tables.readme_block(README) == tables.table(), (
      "the README's founding table differs from docs/tradeoff_quick.csv: run "
      "`python experiments/readme_tables.py` (after `experiments/tradeoff.py --quick` and --save)")
  rows = {r["method"]: r for r in tables.tradeoff.read_csv(str(tables.CSV)) if r["depth"] == 32}
  # The prose under the table: the budget plan fits sqrt's memory with fewer evaluations.
  budget, sqrt = rows["budget"], rows["checkpoint_sqrt"]
  assert budget["temp_bytes"] <= sqrt["temp_bytes"]
  assert (budget["forward_evaluations"], sqrt["forward_evaluations"]) == (58, 64)
  assert f"{budget['flops'] / rows['standard']['flops']:.2f}x" == "1.27x"


@pytest.mark.slow
@pytest.mark.skipif(not compat.JAX_VERSION[:2] == (0, 10), reason="the CSV was measured on jax 0.10.2")
def test_the_csv_is_what_the_compiler_gives_now():
  # Memory, flops and evaluations do not depend on the machine's load: a fresh compile gives them.
  tables = _readme_tables()
  from remat_bench import chains as chains_lib
  # The rows the prose under the table relies on (all eight would take twice as long).
  want = [r for r in tables.tradeoff.read_csv(str(tables.CSV))
          if r["depth"] == 32 and r["method"] in ("standard", "checkpoint_sqrt", "budget")]
  sweep = [chains_lib.Chain(depth=32, **tables.QUICK)]
  got = tables.tradeoff.measure(sweep, [r["method"] for r in want], rounds=0, progress=False)
  for g, w in zip(got, want, strict=True):
    for k in ("method", "temp_bytes", "peak_bytes", "forward_evaluations"):
      assert g[k] == w[k], (w["method"], k, g[k], w[k])
    assert abs(g["flops"] - w["flops"]) <= 1e-9 * w["flops"], w["method"]
