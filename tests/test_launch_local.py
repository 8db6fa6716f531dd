"""Tests of launch/local.py: dry runs, and real local multi-process runs on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from test_launch import LAUNCH, REPO, TRAIN_ARGS, _clean_env, _run

LOCAL = [sys.executable, str(LAUNCH / "local.py")]


def test_local_dry_run():
  res = _run([*LOCAL, "-n", "3", "--devices_per_process", "4", "--port", "4321",
              "--dry-run", "--", *TRAIN_ARGS],
             _clean_env(XLA_FLAGS="--xla_dump_to=/tmp/x "
                        "--xla_force_host_platform_device_count=8"))
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  assert len(lines) == 3
  for rank, line in enumerate(lines):
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words[:5])
    assert env == {"NERVESEG_COORDINATOR": "127.0.0.1:4321",
                   "NERVESEG_NUM_PROCESSES": "3", "NERVESEG_PROCESS_ID": str(rank),
                   "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_dump_to=/tmp/x "
                                "--xla_force_host_platform_device_count=4"}
    assert words[5:] == [sys.executable, "-m", "nerveseg_jax.train", *TRAIN_ARGS]


def test_local_rejects_bad_options():
  res = _run([*LOCAL, "-n", "0", "--dry-run"], _clean_env())
  assert res.returncode == 2 and "--num_processes" in res.stderr
  res = _run([*LOCAL, "--module", "no_such_pkg.train"], _clean_env())
  assert res.returncode == 2 and "no_such_pkg.train" in res.stderr


def _write_module(tmp_path: pathlib.Path, name: str, body: str) -> dict[str, str]:
  (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
  return _clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def test_local_prefixes_output_and_propagates_exit_code(tmp_path):
  env = _write_module(tmp_path, "exiter", f"""
      import os, pathlib, sys, time
      rank = int(os.environ["NERVESEG_PROCESS_ID"])
      print(f"rank={{rank}} of {{os.environ['NERVESEG_NUM_PROCESSES']}}", flush=True)
      pathlib.Path("{tmp_path}", f"printed{{rank}}").touch()
      if rank == 2:
        # Fail only once the others have printed, so the test can see their lines.
        while len(list(pathlib.Path("{tmp_path}").glob("printed*"))) < 3:
          time.sleep(0.01)
        sys.exit(3)
      time.sleep(60)  # the launcher must not wait for this
  """)
  start = time.monotonic()
  res = _run([*LOCAL, "-n", "3", "--module", "exiter"], env)
  assert time.monotonic() - start < 30
  assert res.returncode == 3
  for rank in range(3):
    assert f"[{rank}] rank={rank} of 3" in res.stdout
  assert re.search(r"process 2 \(pid \d+\) exited with code 3; terminating the "
                   r"other 2 running process", res.stdout), res.stdout


def test_local_forwards_sigterm(tmp_path):
  env = _write_module(tmp_path, "term", """
      import signal, sys, time
      def on_term(signum, frame):
        print("checkpointing on SIGTERM", flush=True)
        sys.exit(0)
      signal.signal(signal.SIGTERM, on_term)
      print("ready", flush=True)
      time.sleep(60)
  """)
  proc = subprocess.Popen([*LOCAL, "-n", "2", "--module", "term"], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  ready = 0
  for line in proc.stdout:
    ready += line.strip().endswith("ready")
    if ready == 2:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGTERM
  assert "[0] checkpointing on SIGTERM" in out and "[1] checkpointing on SIGTERM" in out


def test_local_timeout(tmp_path):
  env = _write_module(tmp_path, "sleeper", "import time\ntime.sleep(60)\n")
  res = _run([*LOCAL, "-n", "2", "--module", "sleeper", "--timeout_s", "1",
              "--grace_s", "1"], env)
  assert res.returncode == 124 and "--timeout_s" in res.stdout


@pytest.mark.slow
def test_local_sigkill_of_one_jax_process_fails_fast(tmp_path):
  """A peer killed mid-collective: the survivor is stopped, nothing hangs."""
  env = _write_module(tmp_path, "collective_loop", """
      import os, time
      import jax
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(os.environ["NERVESEG_COORDINATOR"],
                                 int(os.environ["NERVESEG_NUM_PROCESSES"]),
                                 int(os.environ["NERVESEG_PROCESS_ID"]))
      import jax.numpy as jnp
      from jax.experimental import multihost_utils
      total = multihost_utils.process_allgather(jnp.ones(())).sum()
      print(f"ready {int(total)} processes", flush=True)
      while True:  # collectives forever, as a training loop would
        multihost_utils.sync_global_devices("step")
        time.sleep(0.02)
  """)
  proc = subprocess.Popen([*LOCAL, "-n", "2", "--module", "collective_loop",
                           "--timeout_s", "120"],
                          env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
  pids, ready = {}, 0
  try:
    for line in proc.stdout:
      if m := re.match(r"\[launch/local.py\] rank (\d): pid (\d+)", line):
        pids[int(m[1])] = int(m[2])
      ready += line.strip().endswith("ready 2 processes")
      if ready == 2:
        break
    assert ready == 2, "the processes never got through their first collective"
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert time.monotonic() - killed_at < 20
  assert proc.returncode == 128 + signal.SIGKILL
  assert f"process 1 (pid {pids[1]}) was killed by signal SIGKILL" in out, out
  with pytest.raises(ProcessLookupError):  # the survivor is gone too
    os.kill(pids[0], 0)


_TRAIN_MODULES = ("nerveseg_jax.train", "nerveseg_jax.data.pipeline",
                  "nerveseg_jax.data.augment", "nerveseg_jax.models")

# Runs training unchanged, but records, at every checkpoint save, a digest of the
# parameters as *this* process holds them (its own addressable shards), so the test
# can compare what each process ended with rather than the one shared checkpoint.
_DIGEST_WRAPPER = """
import hashlib, json, os
import jax
import numpy as np
from nerveseg_jax import checkpoint, train

_save = checkpoint.TrainCheckpointer.save

def save(self, step, state, *args, **kwargs):
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
    for shard in sorted(leaf.addressable_shards, key=lambda s: str(s.index)):
      h.update(f"{jax.tree_util.keystr(path)}{shard.index}".encode())
      h.update(np.asarray(shard.data).tobytes())
  out = os.path.join(os.environ["DIGEST_DIR"], f"rank{jax.process_index()}.jsonl")
  with open(out, "a") as f:
    f.write(json.dumps({"step": int(step), "digest": h.hexdigest(),
                        "devices": jax.device_count()}) + "\\n")
  return _save(self, step, state, *args, **kwargs)

checkpoint.TrainCheckpointer.save = save
train.run()
"""


@pytest.mark.slow
def test_local_two_process_training(tmp_path):
  """2 CPU processes x 2 devices train :smoke together: same params, one checkpoint."""
  missing = [m for m in _TRAIN_MODULES if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"training is not in the tree yet: {', '.join(missing)} missing")
  env = _write_module(tmp_path, "train_with_digests", _DIGEST_WRAPPER)
  env["DIGEST_DIR"] = str(tmp_path)
  workdir = tmp_path / "run"
  steps = 4
  res = subprocess.run(
      [*LOCAL, "-n", "2", "--devices_per_process", "2", "--timeout_s", "400",
       "--module", "train_with_digests", "--",
       "--config", "configs/unet.py:smoke", "--workdir", str(workdir),
       f"--config.data.data_dir={tmp_path / 'tfds'}",
       f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=2",
       "--config.log_every_steps=2",
       # The launch path is under test here; evaluation and augmentation have their
       # own tests, and skipping them saves two compilations on a 2-core machine.
       "--config.data.fold=-1", "--config.data.augment.enabled=False"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=450)
  assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
  assert "[launch/local.py] all 2 processes finished" in res.stdout
  digests = [[json.loads(l) for l in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
  assert [d["step"] for d in digests[0]] == [2, 4] == [d["step"] for d in digests[1]]
  assert all(d["devices"] == 4 for d in digests[0] + digests[1])
  # Identical parameters in both processes at every save, and training moved them.
  assert [d["digest"] for d in digests[0]] == [d["digest"] for d in digests[1]]
  assert digests[0][0]["digest"] != digests[0][1]["digest"]
  # One checkpoint directory, shared, holding the final step.
  ckpt = workdir / "checkpoints"
  steps_saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert steps_saved[-1] == steps, sorted(p.name for p in ckpt.iterdir())
  assert [p for p in tmp_path.rglob("checkpoints") if p.is_dir()] == [ckpt]
