"""The command line and the measured trade-off table (small sizes)."""

import csv
import functools
import os
import subprocess
import sys

import pytest

from remat._src import cli
from remat_bench import chains, tradeoff


def test_parse_bytes_and_segmenters():
  assert cli.parse_bytes("2GiB") == 2 * 2**30
  assert cli.parse_bytes("1.5GB") == 1_500_000_000
  assert cli.parse_bytes("64MiB") == 64 * 2**20
  assert cli.parse_bytes("1e9") == 10**9
  with pytest.raises(Exception, match="2GiB"):
    cli.parse_bytes("two gigs")
  from remat import segmenters as S
  assert cli.parse_segmenter("every:4") == S.every(4)
  assert cli.parse_segmenter("revolve:3") == S.revolve(3)
  assert cli.parse_segmenter("budget:1MiB") == S.budget(2**20)
  assert cli.parse_segmenter("budget", 1000) == S.budget(1000)
  with pytest.raises(Exception, match="unknown segmenter"):
    cli.parse_segmenter("fastest")


def test_help_runs_as_a_module():
  out = subprocess.run([sys.executable, "-m", "remat", "--help"], capture_output=True, text=True,
                       check=True).stdout
  assert "plan" in out and "compare" in out
  out = subprocess.run([sys.executable, "-m", "remat", "plan", "--help"], capture_output=True, text=True,
                       check=True).stdout
  assert "--segmenter" in out and "--budget" in out
  out = subprocess.run([sys.executable, "-m", "remat", "compare", "--help"], capture_output=True, text=True,
                       check=True).stdout
  assert "--depths" in out and "--methods" in out  # remat_bench.tradeoff's options (the experiment's)


def test_compare_runs_the_experiment_code(capsys, tmp_path):
  rc = cli.main(["compare", "--depths", "2", "4", "--width", "32", "--batch", "16", "--rounds", "0",
                 "--methods", "checkpoint_sqrt", "--no-progress", "--out", str(tmp_path)])
  assert rc == 0
  out = capsys.readouterr().out
  assert "checkpoint_sqrt" in out and "tradeoff.csv" in out
  assert (tmp_path / "tradeoff.csv").exists()


def test_plan_prints_predicted_and_compiled(capsys):
  rc = cli.main(["plan", "--model", "mlp", "--depth", "8", "--width", "64", "--batch", "128",
                 "--segmenter", "revolve:2", "--no-progress"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "revolve" in out and "compiled temp" in out and "predicted temp" in out
  assert "checkpoint [" in out  # the nested segments


def test_plan_reports_an_infeasible_budget(capsys):
  rc = cli.main(["plan", "--model", "mlp", "--depth", "4", "--width", "32", "--batch", "64",
                 "--segmenter", "budget:1kB", "--no-progress"])
  assert rc == 1
  assert "bytes" in capsys.readouterr().err


@functools.lru_cache(maxsize=None)
def _small_sweep():
  sweep = [chains.Chain(model="mlp", depth=d, width=64, batch=256) for d in (4, 16)]
  return tradeoff.measure(sweep, tradeoff.METHODS, rounds=0, progress=False), sweep[0].activation_bytes


def test_tradeoff_measurements_show_the_founding_claims():
  rows, _ = _small_sweep()
  assert {r["method"] for r in rows} == set(tradeoff.METHODS)
  claims = tradeoff.check_claims(rows)
  assert len(claims) == 5
  failed = [text for text, ok in claims if not ok]
  assert not failed, failed
  at = {r["method"]: r for r in rows if r["depth"] == 16}
  assert at["no_storage"]["forward_evaluations"] == 16 * 17 // 2
  assert at["standard"]["forward_evaluations"] == 16
  assert at["checkpoint_sqrt"]["forward_evaluations"] == 32
  assert at["offload"]["forward_evaluations"] == 16  # no matmul recomputed


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
