"""Two real CPU processes (jax.distributed over 127.0.0.1, gloo) train :smoke together."""

import re
import socket
import subprocess
import sys

import pytest

from test_train import REPO, SUBPROCESS_ENV, smoke_data_dir  # pylint: disable=g-bad-import-order

STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together(tmp_path_factory, tmp_path):
  data_dir = smoke_data_dir(tmp_path_factory)
  port = _free_port()
  workdir = tmp_path / "run"
  procs = []
  for rank in range(2):
    env = dict(SUBPROCESS_ENV,
               NERVESEG_COORDINATOR=f"127.0.0.1:{port}", NERVESEG_NUM_PROCESSES="2",
               NERVESEG_PROCESS_ID=str(rank), NERVESEG_INIT_TIMEOUT="120",
               NERVESEG_PARAMS_DIGEST="1",  # each process hashes its replica at the end
               # Two devices per process: a 4-device mesh across the two processes.
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = [sys.executable, "-m", "nerveseg_jax.train", "--config",
            str(REPO / "configs" / "unet.py") + ":smoke", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.num_train_steps={STEPS}",
            f"--config.checkpoint_every_steps={STEPS}", f"--config.eval_every_steps={STEPS}",
            "--config.log_every_steps=2"]
    log = open(tmp_path / f"proc{rank}.log", "w")
    procs.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, text=True), log))
  try:
    for p, _ in procs:
      p.wait(timeout=420)
  except subprocess.TimeoutExpired:
    pytest.fail("the two-process run did not finish in 420 s")
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  outs = [(tmp_path / f"proc{r}.log").read_text() for r in range(2)]
  for r, (p, _) in enumerate(procs):
    assert p.returncode == 0, f"process {r}:\n{outs[r][-4000:]}"
  digests = []
  for out in outs:
    m = re.search(r"^params_sha256\s+([0-9a-f]{64})$", out, re.M)
    assert m, out[-3000:]
    digests.append(m.group(1))
  # Each process hashed its own replica: identical means the gradients were all-reduced.
  assert digests[0] == digests[1]
  steps = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps == [str(STEPS)]
  assert "process 0 of 2" in outs[0] + outs[1]
  # Only process 0 writes: one TensorBoard event file and one config.json for the run.
  assert len(list(workdir.glob("events.out.tfevents*"))) == 1
  assert (workdir / "config.json").exists()
