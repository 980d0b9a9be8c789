"""The command line, the user-model contract, and the measured trade-off table (small sizes)."""

import csv
import functools
import os
import subprocess
import sys
import textwrap

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import pytest

import remat
from remat import segmenters as S
from remat._src.cli import cli, cli_model
from remat._src.plans.plan import LayerCost, Verifier
from remat._src.util.units import format_bytes, parse_bytes
from remat_bench import chains, tradeoff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MLP = ["--model", "mlp", "--depth", "4", "--width", "32", "--batch", "64"]

### Sizes and segmenters


def test_parse_bytes_and_segmenters():
  assert parse_bytes("2GiB") == 2 * 2**30
  assert parse_bytes("1.5GB") == 1_500_000_000
  assert parse_bytes("64MiB") == 64 * 2**20
  assert parse_bytes("1e9") == 10**9
  assert parse_bytes("1,024") == 1024
  for bad in ("two gigs", "-5MiB", "0", "1,5GB", "5 MiBs", "", "nan", "inf"):
    with pytest.raises(ValueError, match="2GiB, 512MiB"):
      parse_bytes(bad)
  assert cli.parse_segmenter("every:4") == S.every(4)
  assert cli.parse_segmenter("revolve:3") == S.revolve(3)
  assert cli.parse_segmenter("multilevel") == S.multilevel(2)
  assert cli.parse_segmenter("budget:1MiB") == S.budget(2**20)
  assert cli.parse_segmenter("budget", 1000) == S.budget(1000)
  with pytest.raises(ValueError, match="unknown segmenter"):
    cli.parse_segmenter("fastest")


def test_format_bytes_is_one_format():
  assert format_bytes(1018) == "1,018 B"
  assert format_bytes(46199800) == "44.06 MiB"
  assert format_bytes(46199800, exact=True) == "44.06 MiB (46,199,800 bytes)"
  assert format_bytes(3 * 2**30) == "3.00 GiB"


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(n=st.integers(1, 2**50))
def test_parse_bytes_reads_what_format_bytes_writes(n):
  text = format_bytes(n)
  back = parse_bytes(text)
  unit = next((u for name, u in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
               if text.endswith(name)), 1)
  assert abs(back - n) <= 0.005 * unit + 0.5  # two decimals of the unit
  assert parse_bytes(f"{n:,} bytes") == parse_bytes(str(n)) == n  # the exact form of messages


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(text=st.text(max_size=12))
def test_parse_bytes_rejects_garbage_with_the_accepted_forms(text):
  try:
    n = parse_bytes(text)
  except ValueError as e:
    assert repr(text) in str(e) and "2GiB" in str(e)
  else:
    assert isinstance(n, int) and n >= 1


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(kind=st.sampled_from(["every", "multilevel", "revolve"]), n=st.integers(1, 64))
def test_parse_segmenter_reads_every_counted_form(kind, n):
  assert cli.parse_segmenter(f"{kind}:{n}") == getattr(S, kind)(n)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(kind=st.sampled_from(["every", "multilevel", "revolve", "sqrt", "none", "budget", "x"]),
                  arg=st.text(max_size=6))
def test_parse_segmenter_rejects_garbage_in_one_line(kind, arg):
  text = f"{kind}:{arg}"
  try:
    seg = cli.parse_segmenter(text)
  except ValueError as e:
    msg = str(e)
    assert "\n" not in msg and (repr(arg) in msg or repr(text) in msg or f"`{kind}`" in msg)
  else:
    assert isinstance(seg, S.Segmenter)


def test_python_budget_of_one_byte_is_a_clear_value_error():
  layers = [lambda w, x: jnp.tanh(x @ w)] * 4
  ws, x = [jnp.eye(32)] * 4, jnp.ones((64, 32))
  with pytest.raises(ValueError, match=r"`remat\.segmenters\.budget\(1\)`: no plan is predicted to fit 1 B; "
                     r"the smallest feasible budget for this chain is .* bytes\), predicted"):
    remat.sequential(layers, S.budget(1))(ws, x)
  with pytest.raises(ValueError, match="positive int `max_bytes`"):
    S.budget(0)


def test_budget_message_after_compiling_names_the_smallest_compiled():
  costs = [LayerCost(1000, 1000, 1000, 1000, 1e6, 3e6)] * 8
  too_big = Verifier(key="test-too-big", temp_bytes=lambda plan: 10**6)  # every plan compiles too big
  with pytest.raises(ValueError) as e:
    S.budget(1024 * 20).plan(costs, verifier=too_big)
  msg = str(e.value)
  assert "no plan compiled to within 20.00 KiB (20,480 bytes) in 12 compile(s)" in msg
  assert "the smallest compiled to 976.56 KiB (1,000,000 bytes)" in msg  # one format for every figure
  assert "at least 1000000, or `max_compiles`" in msg


### The command line: one line for every bad input, exit status 2


BAD = [
    (["--depth", "0"], "--depth", "'0'"),
    (["--width", "0"], "--width", "'0'"),
    (["--heads", "3"], "--heads 3", "--heads 4"),
    (["--batch", "0"], "--batch", "'0'"),
    (["--seq-len", "-1"], "--seq-len", "'-1'"),
    (["--depth", "x"], "--depth", "'x'"),
    (["--segmenter", "budget:2GiB", "--budget", "1GiB"], "--budget 1GiB", "give the size once"),
    (["--segmenter", "budget", "--budget", "-5MiB"], "--budget", "'-5MiB'"),
    (["--segmenter", "budget", "--budget", "lots"], "--budget", "'lots'"),
    (["--segmenter", "budget"], "--segmenter budget", "--budget 2GiB"),
    (["--budget", "1GiB"], "--budget", "--segmenter budget --budget SIZE"),
    (["--segmenter", "revolve:x"], "--segmenter revolve:x", "revolve:3"),
    (["--segmenter", "every:0"], "--segmenter every:0", "every:4"),
    (["--segmenter", "sqrt:2"], "--segmenter sqrt:2", "takes no argument"),
    (["--segmenter", "fastest"], "--segmenter fastest", "revolve:S"),
    (["--model", "foo"], "--model foo", "package.module:factory"),
    (["--model", "no_such_module_xyz:factory"], "--model no_such_module_xyz:factory", "cannot import"),
    (["--model", "missing_file.py:model"], "--model missing_file.py:model", "no file"),
    (["--model", "examples/my_model.py:nothere"], "--model examples/my_model.py:nothere", "no attribute"),
    (["--model", "examples/my_model.py:"], "--model examples/my_model.py:", "does not name a factory"),
    (["--model", "examples/my_model.py:model", "--heads", "2"], "--heads 2", "takes no `heads`"),
    (["--model", "mlp", "--heads", "2"], "--heads 2", "applies to the transformer"),
]


@pytest.mark.parametrize("argv,flag,fix", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_is_one_line_with_status_2(argv, flag, fix, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert cli.main(["plan", *argv, "--no-progress"]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert "\n" not in err and err.startswith("remat plan: error: argument "), err
  assert flag in err and fix in err, err
  assert "Traceback" not in captured.err + captured.out


def test_an_infeasible_budget_is_one_line_naming_the_flag(capsys):
  assert cli.main(["plan", *SMALL_MLP, "--segmenter", "budget:1", "--no-progress"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("remat plan: error: argument --segmenter budget:1: ")
  assert "smallest feasible budget for this chain is" in err and "predicted" in err
  assert cli.main(["plan", *SMALL_MLP, "--segmenter", "budget", "--budget", "1kB", "--no-progress"]) == 2
  assert capsys.readouterr().err.startswith("remat plan: error: argument --budget 1kB: ")


def test_bad_compare_input_is_one_line_with_status_2(capsys):
  for argv, fix in [(["--depths", "0"], "--depths"), (["--batch", "0"], "--batch"),
                    (["--model", "transformer", "--width", "256", "--heads", "3"], "--heads 4")]:
    assert cli.main(["compare", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("remat compare: error: ") and fix in err, err


def test_help_runs_as_a_module_and_says_what_a_budget_counts():
  out = subprocess.run([sys.executable, "-m", "remat", "--help"], capture_output=True, text=True,
                       check=True).stdout
  assert "plan" in out and "compare" in out
  out = subprocess.run([sys.executable, "-m", "remat", "plan", "--help"], capture_output=True, text=True,
                       check=True).stdout
  assert "--segmenter" in out and "--budget" in out
  flat = " ".join(out.split())
  assert "compiled temp memory of the chain's reference training step" in flat
  assert "not parameters, optimizer state, inputs or gradients" in flat
  assert "path/to/file.py:factory" in flat and '"module"' in flat and '"layers"' in flat
  out = subprocess.run([sys.executable, "-m", "remat", "compare", "--help"], capture_output=True, text=True,
                       check=True).stdout
  assert "--depths" in out and "--methods" in out  # remat_bench.tradeoff's options (the experiment's)


### `remat plan`: consistent numbers


def _table(out: str) -> dict[str, list[str]]:
  rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
  return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_plan_prints_predicted_and_compiled_with_labels(capsys):
  rc = cli.main(["plan", "--model", "mlp", "--depth", "8", "--width", "64", "--batch", "128",
                 "--segmenter", "revolve:2", "--no-progress"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "checkpoint [" in out  # the nested segments
  assert "[3/3] compiling the plan" in out and "[4/" not in out
  table = _table(out)
  assert set(table) == {"plain backprop", "revolve(slots=2)"}
  assert "| compiled temp" in out and "predicted temp" in out and "predicted GFLOP" in out
  assert "22 layer forward evaluations (14 recomputed)" in out
  assert table["revolve(slots=2)"][-1] == "22"


def test_plan_header_budget_line_and_table_agree(capsys):
  rc = cli.main(["plan", "--model", "mlp", "--depth", "16", "--width", "128", "--batch", "256",
                 "--segmenter", "budget:3MiB", "--no-progress"])
  out = capsys.readouterr().out
  assert rc == 0
  compiled = _table(out)["budget(3.00 MiB)"][0].split(" (")[0]
  assert f"compiles to {compiled}: fits." in out  # the one compiled figure, in both places
  # ... and it is the figure the planner verified (the same reference step).
  model = cli_model.load_model("mlp", depth=16, width=128, batch=256, seq_len=None, heads=None)
  plan = model.plan(S.budget(3 * 2**20))
  assert format_bytes(plan.compiled_temp_bytes) == compiled


### Your own model


def test_plan_on_the_example_model_file(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  rc = cli.main(["plan", "--model", "examples/my_model.py:model", "--depth", "4", "--batch", "2",
                 "--segmenter", "every:2", "--no-progress"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "examples/my_model.py:model: 4 linen blocks, input float32[2, 256, 256]" in out
  assert "every(k=2)" in out and "checkpoint [0, 2)" in out


USER_MODULE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from flax import nnx

    def stacked(depth=6):
      return {"layers": lambda w, x: jnp.tanh(x @ w),
              "params": jnp.zeros((depth, 32, 32)), "x": jnp.ones((16, 32))}

    def nnx_chain():
      rngs = nnx.Rngs(0)
      return {"module": nnx.Sequential(*[nnx.Linear(32, 32, rngs=rngs) for _ in range(4)]),
              "x": jax.ShapeDtypeStruct((16, 32), jnp.float32)}

    def wrong_shapes():
      return {"layers": [lambda w, x: x @ w] * 2, "params": [jnp.zeros((3, 5))] * 2, "x": jnp.ones((4, 3))}

    def not_a_dict():
      return [1, 2]

    def raises():
      raise RuntimeError("no GPU here")
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / "user_models_t12.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "user_models_t12"
  sys.modules.pop("user_models_t12", None)


def test_plan_on_a_module_factory(user_module, capsys):
  assert cli.main(["plan", "--model", f"{user_module}:stacked", "--depth", "8", "--segmenter", "revolve:2",
                   "--no-progress"]) == 0
  assert "8 layers, input float32[16, 32]" in capsys.readouterr().out
  model = cli_model.load_model(f"{user_module}:nnx_chain")
  assert model.depth == 4 and model.key is None
  assert cli.main(["plan", "--model", f"{user_module}:nnx_chain", "--segmenter", "every:2",
                   "--no-progress"]) == 0
  assert "4 NNX blocks" in capsys.readouterr().out


@pytest.mark.parametrize("factory,fix", [
    ("wrong_shapes", "running the chain on 'x' float32[4, 3] raised TypeError"),
    ("not_a_dict", "the factory returned list; it must return a dict"),
    ("raises", "calling `raises()` raised RuntimeError: no GPU here"),
])
def test_a_broken_factory_is_one_line(user_module, factory, fix, capsys):
  assert cli.main(["plan", "--model", f"{user_module}:{factory}", "--no-progress"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and fix in err, err


def test_the_dict_contract_is_checked():
  x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
  for spec, msg in [({"x": x}, "exactly one of the keys 'module' or 'layers'"),
                    ({"layers": [abs], "x": x, "y": 1}, "unknown keys ['y']"),
                    ({"layers": [abs, 3], "x": x}, "entry 1 is int"),
                    ({"layers": [abs], "params": [(), ()], "x": x}, "one parameter pytree per layer (1)"),
                    ({"layers": [abs]}, "needs 'x'"),
                    ({"module": object(), "x": x}, "must be a chain of blocks")]:
    with pytest.raises(cli_model.ModelError, match=msg.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
      cli_model.from_dict(spec)


def test_linen_variables_given_or_initialised_as_shapes():
  import flax.linen as nn

  x = jnp.ones((2, 8))
  layers = [nn.Dense(8), nn.relu, nn.Dense(8)]
  seq = nn.Sequential(layers)
  variables = seq.init(jax.random.key(0), x)
  a = cli_model.from_dict({"module": seq, "x": x})
  b = cli_model.from_dict({"module": seq, "x": x, "variables": variables})
  assert jax.tree.structure(a.specs()[0]) == jax.tree.structure(b.specs()[0])
  assert a.params[1] == ()  # nn.relu: a parameterless layer
  # The chain computes what nn.Sequential computes.
  y = b.run()(list(b.params), x, b.key)
  assert jnp.allclose(y, seq.apply(variables, x))


### `remat compare` and the trade-off table


def test_compare_runs_the_experiment_code(capsys, tmp_path):
  rc = cli.main(["compare", "--depths", "2", "4", "--width", "32", "--batch", "16", "--rounds", "1",
                 "--methods", "checkpoint_sqrt", "--no-progress", "--out", str(tmp_path)])
  assert rc == 0
  out = capsys.readouterr().out
  assert "checkpoint_sqrt" in out and "tradeoff.csv" in out
  assert (tmp_path / "tradeoff.csv").exists()
  # The progress counter: 2 depths x (2 methods + timing), never past its total.
  steps = [line.split("]")[0] for line in out.splitlines() if line.startswith("[")]
  assert steps[-1] == "[6/6" and all(int(s[1:].split("/")[0]) <= 6 for s in steps)


@functools.lru_cache(maxsize=None)
def _small_sweep():
  sweep = [chains.Chain(model="mlp", depth=d, width=64, batch=256) for d in (4, 16)]
  return tradeoff.measure(sweep, tradeoff.METHODS, rounds=0, progress=False), sweep[0].activation_bytes


def test_tradeoff_measurements_show_the_founding_claims():
  rows, act = _small_sweep()
  assert {r["method"] for r in rows} == set(tradeoff.METHODS)
  claims = tradeoff.check_claims(rows, act)
  assert len(claims) == 5
  failed = [text for text, ok in claims if not ok]
  assert not failed, failed
  at = {r["method"]: r for r in rows if r["depth"] == 16}
  assert at["no_storage"]["forward_evaluations"] == 16 * 17 // 2
  assert at["standard"]["forward_evaluations"] == 16
  assert at["checkpoint_sqrt"]["forward_evaluations"] == 32
  assert at["offload"]["forward_evaluations"] == 16  # no matmul recomputed


def test_claim_wording_matches_the_numbers():
  rows, act = _small_sweep()
  flat = next(text for text, _ in tradeoff.check_claims(rows, act) if text.startswith("forward_only"))
  fo = {r["depth"]: r["temp_bytes"] / act for r in rows if r["method"] == "forward_only"}
  assert f"{fo[4]:.1f} -> {fo[16]:.1f} activations" in flat and "within two activations" in flat
  # A claim that does not apply is not made: one shallow depth.
  shallow = [dict(r, depth=2) for r in rows if r["depth"] == 4]
  assert tradeoff.check_claims(shallow, act) == []
  # A forward pass that grew would be reported as such, with its numbers.
  grown = [dict(r, temp_bytes=r["temp_bytes"] + 10 * act)
           if r["method"] == "forward_only" and r["depth"] == 16 else r for r in rows]
  text, ok = next(c for c in tradeoff.check_claims(grown, act) if c[0].startswith("forward_only"))
  assert not ok and "(+10.0)" in text


def test_tradeoff_csv_and_plots(tmp_path):
  rows, act = _small_sweep()
  path = tmp_path / "tradeoff.csv"
  tradeoff.write_csv(rows, str(path))
  with open(path) as f:
    header = next(csv.reader(f))
  assert header[:8] == ["method", "depth", "peak_bytes", "temp_bytes", "host_temp_bytes", "flops",
                        "forward_evaluations", "step_time_s"]
  assert "backend" in header and "device_kind" in header
  assert tradeoff.read_csv(str(path))[0]["depth"] == 4
  paths = tradeoff.plot(rows, str(tmp_path), act)
  assert all(os.path.getsize(p) > 1000 for p in paths)
  assert "no_storage" in tradeoff.founding_table(rows, act)


def test_plots_have_titles_units_one_colour_per_method_and_no_overlapping_labels():
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.colors import to_hex

  rows, act = _small_sweep()
  figs = tradeoff.figures(rows, act)
  assert [f.get_label() for f in figs] == ["memory_vs_depth.png", "compute_vs_depth.png", "frontier.png"]
  for fig in figs:
    ax = fig.axes[0]
    assert ax.get_title(), fig.get_label()
    assert "(" in ax.get_xlabel() and "(" in ax.get_ylabel(), (ax.get_xlabel(), ax.get_ylabel())
    assert not ax.texts  # points are named in the legend, so no label can overlap another
    colours = {}
    for line in ax.get_lines():
      colours[line.get_label()] = to_hex(line.get_color())
    for coll in ax.collections:
      colours[coll.get_label().split(":")[0]] = to_hex(coll.get_facecolor()[0])
    assert colours, fig.get_label()
    for method, colour in colours.items():
      assert colour == to_hex(tradeoff.STYLES[method][0]), (fig.get_label(), method)
  frontier = figs[2].axes[0]
  labels = [t.get_text() for t in frontier.get_legend().get_texts()]
  assert len(labels) == len(set(labels)) == len(tradeoff.METHODS) - 1  # forward_only has no backward
  assert any(label.startswith("budget: ") and "act" in label and "x" in label for label in labels)
  # The large star lies under the smaller markers: a point it coincides with stays visible.
  order = {c.get_label().split(":")[0]: c.get_zorder() for c in frontier.collections}
  assert all(order["budget"] < z for m, z in order.items() if m != "budget"), order
  import matplotlib.pyplot as plt

  for fig in figs:
    plt.close(fig)


### remat fit


def test_fit_prints_the_plan_and_the_largest_batch(capsys):
  rc = cli.main(["fit", "--model", "mlp", "--depth", "6", "--width", "64", "--batch", "512",
                 "--memory", "1MiB", "--no-progress"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "Plan:" in out and "checkpoint [" in out and "remat.fit" in out
  # The progress of the search: a line per compile (a tqdm bar without --no-progress).
  assert "[1/12] fitting to 1.00 MiB" in out
  assert "[1/12] compile 1 (plain)" in out and "[2/12] compile 2" in out
  row = next(line for line in out.splitlines() if line.startswith("| largest batch"))
  plain_max, fit_max = (int(c) for c in row.split("|")[2:4])
  assert fit_max > plain_max >= 1


def test_fit_errors_are_one_line(capsys):
  assert cli.main(["fit", "--model", "mlp", "--memory", "-3GiB"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "--memory" in err
  assert cli.main(["fit", "--model", "mlp"]) == 2
  assert "--memory" in capsys.readouterr().err
  rc = cli.main(["fit", "--model", "mlp", "--depth", "4", "--width", "32", "--batch", "64", "--memory", "1kB",
                 "--no-search", "--no-progress"])
  out = capsys.readouterr().out
  assert rc == 1 and "does not fit" in out
  # Arguments alone exceed 1 kB: refused without compiling, and donation (which the CLI does) is not advised.
  assert "without compiling" in out and "donate" not in out.split("without compiling")[1]
  for bad in ("0", "-1", "soon", "inf"):
    assert cli.main(["fit", "--model", "mlp", "--memory", "1GiB", "--max-time", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--max-time" in err and repr(bad) in err


def test_largest_search_and_what_a_stopped_search_reports():
  from remat._src.cli.cli_fit import Largest
  seen = []
  s = Largest(lambda n: seen.append(n) or n <= 37, 4)
  assert s.run() == 37 and s.found() == "37"
  assert seen[:5] == [4, 8, 16, 32, 64]  # doubling, then bisection between 32 and 64
  assert Largest(lambda n: n <= 3, 16).run() == 3
  assert Largest(lambda n: False, 4).run() == 0
  stopped = Largest(lambda n: n <= 37, 4)
  for n in (4, 8, 16):
    stopped.probe(n)
  assert stopped.found() == ">= 16 (stopped)"
  stopped.probe(64)
  assert stopped.found() == ">= 16 (stopped, 64 does not)"


@pytest.mark.parametrize("stop", ["time", "ctrl-c"])
def test_fit_search_is_bounded_and_reports_what_it_found(stop, capsys, monkeypatch):
  from remat._src.cli import cli_fit
  calls = []

  def fake_fits(model, memory):  # remat.fit's probes: the user presses Ctrl-C during the first
    calls.append(model)
    if stop == "ctrl-c":
      raise KeyboardInterrupt
    return True

  monkeypatch.setattr(cli_fit, "fits", fake_fits)
  batch = lambda m: jax.tree_util.tree_leaves(m.x)[0].shape[0]  # noqa: E731
  monkeypatch.setattr(cli_fit, "plain_peak", lambda m: 0 if batch(m) <= 100 else 2**40)
  clock = iter(range(0, 10_000, 7))
  monkeypatch.setattr(cli_fit, "_clock", (lambda: next(clock)) if stop == "time" else (lambda: 0.0))
  rc = cli.main(["fit", "--model", "mlp", "--depth", "4", "--width", "32", "--batch", "64",
                 "--memory", "1GiB",
                 "--max-time", "30", "--no-progress"])
  out = capsys.readouterr().out
  assert rc == (124 if stop == "time" else 130), out
  assert "plain backprop at batch 64: fits" in out  # each probe printed as it ends
  assert ("--max-time 30 s reached" in out) if stop == "time" else ("interrupted" in out)
  row = next(line for line in out.splitlines() if line.startswith("| largest batch"))
  assert "(stopped" in row


@pytest.mark.parametrize("argv,where", [(["--bogus"], "with no command"),
                                        (["--bogus", "plan"], "before the command 'plan'")])
def test_an_unknown_flag_before_the_command_is_named(argv, where, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and f"unrecognized argument '--bogus' {where}" in err and "plan,fit" in err


BATCHNORM_MODEL = '''
import jax, jax.numpy as jnp, flax.linen as nn

class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(x.shape[-1])(x))
    return x + jnp.tanh(h)

class Sows(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    if not self.is_initializing():
      self.put_variable("stats", "h", x)  # a collection that initialisation does not make
    return jnp.tanh(nn.Dense(x.shape[-1])(x))

def model(depth: int = 4, batch: int = 8, width: int = 32):
  return {"module": [Block() for _ in range(depth)],
          "x": jax.ShapeDtypeStruct((batch, width), jnp.float32), "args": (True,)}

def sows():
  return {"module": [Sows() for _ in range(2)], "x": jax.ShapeDtypeStruct((8, 32), jnp.float32),
          "args": (True,)}
'''


def test_plan_a_batchnorm_model_in_training_mode(tmp_path, capsys):
  # BatchNorm updates `batch_stats` in training: the chain is measured with it mutable.
  path = tmp_path / "bn.py"
  path.write_text(BATCHNORM_MODEL)
  assert cli.main(["plan", "--model", f"{path}:model", "--segmenter", "every:2", "--no-progress"]) == 0
  assert "compiled temp" in capsys.readouterr().out
  assert cli.main(["plan", "--model", f"{path}:sows", "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "ModifyScopeVariableError" in err and "create it in `init` too" in err and "\n" not in err.strip()


def test_cli_modules_import_one_way():
  """cli -> cli_fit -> cli_model -> cli_util: no command module imports the entry point or a later one."""
  import ast
  import pathlib

  order = ["cli", "cli_fit", "cli_model", "cli_util"]
  src = pathlib.Path(__file__).parent.parent / "remat" / "_src" / "cli"
  for i, name in enumerate(order):
    tree = ast.parse((src / f"{name}.py").read_text())
    imported = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("remat._src.cli.cli")}
    assert imported <= set(order[i + 1:]), (name, imported)
