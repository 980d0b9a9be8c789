"""One search per jax.distributed job: docs/multihost.md's example, run as 2 processes x 2 CPU devices."""

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

DOC = pathlib.Path(__file__).parent.parent / "docs" / "multihost.md"


def example() -> str:
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  (train,) = [b for b in blocks if b.startswith("# train.py")]
  return train


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_the_multihost_example_plans_once_and_every_process_runs_that_plan(tmp_path):
  script = tmp_path / "train.py"
  script.write_text(example())
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "REMAT_CACHE_DIR": "",
         "JAX_PLATFORMS": "cpu"}
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, str(script), str(i), "2", port], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("the 2-process job did not finish in 300 s")
    assert p.returncode == 0, err[-3000:]
    outs.append(out.strip().splitlines()[-1].split(" ", 3))
  (p0, n0, c0, rest0), (p1, n1, c1, rest1) = outs
  assert (p0, p1, n0, n1) == ("0", "1", "4", "4")
  assert int(c0) > 1 and c1 == "1"  # process 0 searched; process 1 compiled the chosen plan once
  plan0, loss0 = rest0.rsplit(" ", 1)
  plan1, loss1 = rest1.rsplit(" ", 1)
  assert plan0 == plan1 and "checkpoint=True" in plan0  # one plan, and it recomputes
  assert loss0 == loss1


@pytest.mark.slow
def test_a_process_that_traces_another_step_gets_an_error_not_a_hang(tmp_path):
  other = 'remat.fit(step, "4MiB" if jax.process_index() == 0 else "5MiB"'
  src = example().replace('remat.fit(step, "4MiB"', other)
  src = src.split("ws, loss = fitted(ws, x)")[0] + "print('planned', jax.process_index(), report.compiles)\n"
  assert "5MiB" in src
  script = tmp_path / "train.py"
  script.write_text(src)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "REMAT_CACHE_DIR": "",
         "JAX_PLATFORMS": "cpu"}
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, str(script), str(i), "2", port], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    _, err1 = procs[1].communicate(timeout=300)
  finally:
    for p in procs:
      p.kill()
  assert procs[1].returncode != 0
  assert "traced a different step than process 0" in err1 and "same global shapes" in err1, err1[-2000:]
