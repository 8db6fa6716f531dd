"""The training loop on the real pipeline and models (configs/unet.py:smoke, synthetic data).

One in-process reference run (8 fake CPU devices) is shared: the loss goes down, and
resumed or re-sharded runs must reproduce it: after SIGTERM and after SIGKILL
(bitwise), on 1 device and on a data x fsdp mesh (fp tolerance).
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from flax import nnx

import conftest
from nerveseg_jax import loading, train, train_state, train_step
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.configs import unet

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30  # long enough that a signal sent after the first checkpoint lands mid-run
# The runs here compile the same programs again and again (the resumed processes, the
# reference): a persistent compilation cache shared by this process and its children
# saves most of that. Keyed by program hash, so a stale entry is never reused wrongly.
CACHE_DIR = pathlib.Path(tempfile.gettempdir()) / f"nerveseg_jax_test_cache_{os.getuid()}"
if not jax.config.jax_compilation_cache_dir:
  jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
SUBPROCESS_ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def smoke_data_dir(tmp_path_factory) -> pathlib.Path:
  """The synthetic smoke set, built once per test session (also used by subprocesses)."""
  root = conftest.shared_dir(tmp_path_factory, "smoke_data")
  with conftest.built_once(root) as build:
    if build:
      from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      cfg = smoke_config(root)
      pipeline.load_arrays(cfg.data, "train")
      pipeline.load_arrays(cfg.data, "val")
  return root


def smoke_config(data_dir, **overrides):
  c = unet.get_config("smoke")
  c.data.data_dir = str(data_dir)
  c.num_train_steps = STEPS
  c.log_every_steps = 1          # every step in the loss curve
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 10
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def cli_args(data_dir, workdir, **overrides):
  args = [sys.executable, "-m", "nerveseg_jax.train", "--config",
          str(REPO / "configs" / "unet.py") + ":smoke", f"--workdir={workdir}"]
  over = {"data.data_dir": str(data_dir), "num_train_steps": STEPS, "log_every_steps": 1,
          "eval_every_steps": 20, "checkpoint_every_steps": 10, **overrides}
  args += [f"--config.{k}={v}" for k, v in over.items()]
  return args


def run_result(stdout: str) -> dict:
  """The `done: WORKDIR` table train prints last, as {key: text}."""
  lines = stdout.splitlines()
  at = [i for i, line in enumerate(lines) if line.startswith("done: ")]
  assert at, stdout[-3000:]
  fields = {}
  for line in lines[at[-1] + 3:]:  # after the header and its rule
    key, _, value = line.partition(" ")
    if not key or not value.strip():
      break
    fields[key] = value.strip()
  return fields


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return smoke_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  os.environ["NERVESEG_PARAMS_DIGEST"] = "1"  # the resume test compares the final hash
  try:
    result = train.train_and_evaluate(smoke_config(data_dir), workdir)
  finally:
    os.environ.pop("NERVESEG_PARAMS_DIGEST", None)
  return workdir, result


def test_smoke_training_loss_goes_down(reference):
  workdir, result = reference
  losses = [h["loss"] for h in result["history"]]
  assert len(losses) == STEPS and all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.97 * np.mean(losses[:5]), losses
  for key in ("val_kaggle_score", "val_nerve_dice", "val_presence_accuracy",
              "val_images_per_sec", "train_dice", "train_presence_accuracy"):
    assert key in result, key
  assert 0.0 <= result["val_kaggle_score"] <= 1.0
  assert (workdir / "config.json").exists()
  # Every evaluation is also a line of val_history.jsonl (what sweeps read).
  evals = workdir_lib.read_val_history(workdir)
  assert [e["step"] for e in evals] == [20, STEPS]
  assert evals[-1]["kaggle_score"] == pytest.approx(result["val_kaggle_score"])
  assert evals[-1]["nerve_dice"] == pytest.approx(result["val_nerve_dice"])
  tags = _event_tags(workdir)
  for tag in ("train/loss", "train/dice", "train/presence_accuracy", "train/learning_rate",
              "val/kaggle_score", "val/nerve_dice", "val/presence_accuracy",
              "val/images_per_sec", "train/steps_per_sec", "compile/train_step"):
    assert tag in tags, (tag, sorted(tags))
  assert re.search(r"compiled train_step in [0-9.]+s; memory: arguments",
                   tags["compile/train_step"]), tags["compile/train_step"]
  assert result["compile_seconds"] > 0
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == STEPS and 20 in steps  # last, and the best-scored are kept
  config, model = loading.load_model(workdir, which="latest")
  assert config.model.features == 4 and model is not None
  # Running again on a finished workdir resumes and does nothing.
  again = train.train_and_evaluate(workdir_lib.read_config(workdir), workdir)
  assert again["start_step"] == STEPS


def _event_tags(workdir) -> dict[str, str]:
  """{tag: last text value or ''} over the TensorBoard event files of a workdir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = {}
  files = sorted(workdir.glob("events.out.tfevents*"))
  assert files, f"no event file in {workdir}"
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        text = ""
        if value.metadata.plugin_data.plugin_name == "text":
          text = tf.make_ndarray(value.tensor).reshape(-1)[0].decode()
        tags[value.tag] = text
  return tags


def test_optimizer_is_adamw_warmup_cosine_with_clipping():
  c = unet.get_config("smoke")
  c.update(num_train_steps=100, warmup_steps=10, learning_rate=1e-2, grad_clip_norm=1.0,
           weight_decay=0.1)
  tx, schedule = train_state.make_optimizer(c)
  # Linear warmup to the peak, then cosine down to 0 at num_train_steps.
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 55, 100)],
                             [0.0, 5e-3, 1e-2, 5e-3, 0.0], rtol=1e-5, atol=1e-9)
  params = {"kernel": np.ones((2, 3), np.float32), "bias": np.ones((3,), np.float32)}
  # Clipping: huge gradients act exactly like the same gradients scaled to norm 1
  # fed to the unclipped optimizer (two steps, so Adam's moments see the scale).
  grads = [{"kernel": np.full((2, 3), 1e4, np.float32), "bias": np.full((3,), -2e4, np.float32)},
           {"kernel": np.full((2, 3), 0.1, np.float32), "bias": np.zeros((3,), np.float32)}]
  unclipped, _ = train_state.make_optimizer(dict_config(c, grad_clip_norm=0.0))
  s1, s2 = tx.init(params), unclipped.init(params)
  for g in grads:
    norm = float(np.sqrt(sum(np.sum(np.square(v)) for v in g.values())))
    u1, s1 = tx.update(g, s1, params)
    u2, s2 = unclipped.update(jax.tree.map(lambda v: v / max(norm, 1.0), g), s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-5)
  # Decoupled weight decay on kernels only: with zero gradients a kernel shrinks by
  # lr * weight_decay * p, a bias not at all.
  zeros = jax.tree.map(np.zeros_like, params)
  state = tx.init(params)
  _, state = tx.update(zeros, state, params)           # step 0: learning rate 0
  u, _ = tx.update(zeros, state, params)               # step 1: learning rate 1e-3
  np.testing.assert_allclose(u["kernel"], -1e-3 * 0.1 * params["kernel"], rtol=1e-5)
  np.testing.assert_array_equal(u["bias"], 0.0)


def dict_config(c, **overrides):
  c = c.copy_and_resolve_references()
  c.update(overrides)
  return c


def test_state_is_created_sharded_and_the_step_donates_it():
  from nerveseg_jax import sharding  # pylint: disable=g-import-not-at-top
  cfg = smoke_config("", **{"mesh.data": 2, "mesh.fsdp": 4})
  mesh = sharding.make_mesh(cfg.mesh)
  tx, schedule = train_state.make_optimizer(cfg)
  parts = train_state.model_parts(cfg)
  state, shardings = train_state.init_state(cfg, tx, mesh)
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding == want
  # FSDP: kernels are physically split over the 4 fsdp devices, and Adam's moments
  # (the optimizer state) have the very same layout as the parameters.
  params = jax.tree.leaves(state["params"])
  split = [p for p in params if "fsdp" in p.sharding.spec]
  assert len(split) >= len(params) // 2, [p.sharding.spec for p in params]
  for p in split:
    dim = list(p.sharding.spec).index("fsdp")
    assert p.addressable_shards[0].data.shape[dim] * 4 == p.shape[dim]
  layout = lambda tree: sorted((x.shape, str(x.sharding.spec)) for x in jax.tree.leaves(tree))
  flat = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
  for moment in ("mu", "nu"):
    leaves = [x for path, x in flat if f".{moment}" in jax.tree_util.keystr(path)]
    assert layout(leaves) == layout(state["params"]), moment
  h, w = cfg.data.image_size
  batch = {"image": np.zeros((8, h, w, 1), np.float32), "mask": np.zeros((8, h, w, 1), np.float32),
           "has_nerve": np.zeros((8,), np.float32)}
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  step = train_step.jit_train_step(cfg, parts, tx, schedule, mesh, shardings)
  new, health, _, _ = step(state, train_step.initial_health(mesh), batch)
  # Donated: the old state's buffers were reused for the new one.
  assert all(x.is_deleted() for x in jax.tree.leaves(state["params"]))
  for leaf, want in zip(jax.tree.leaves(new), jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding == want
  assert int(new["step"]) == 1 and float(health[0]) == -1.0


def assert_same_curve(got, want):
  """Same loss curve up to floating-point reduction order.

  Another device count sums the gradient and the batch-norm statistics in another
  order (~1e-7 relative); training amplifies that drift step by step (measured: 1e-6 at
  step 5, ~1e-3 by step 30). So the first steps must agree tightly, where any real
  difference (per-device statistics, a wrong gradient mean, other data) would show at
  once, and the whole curve within the drift.
  """
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape == (STEPS,)
  np.testing.assert_allclose(got[:6], want[:6], rtol=2e-5)
  np.testing.assert_allclose(got, want, rtol=3e-3)


def test_fsdp_mesh_gives_the_same_curve(data_dir, reference, tmp_path):
  _, ref = reference
  # Same num_train_steps as the reference: the schedule depends on it.
  cfg = smoke_config(data_dir, checkpoint_every_steps=STEPS, eval_every_steps=STEPS,
                     **{"mesh.data": 2, "mesh.fsdp": 4})
  out = train.train_and_evaluate(cfg, tmp_path)
  assert_same_curve([h["loss"] for h in out["history"]], [h["loss"] for h in ref["history"]])


def test_one_device_gives_the_same_curve(data_dir, reference, tmp_path):
  _, ref = reference
  script = (
      "import json, sys\n"
      "from nerveseg_jax import train\n"
      "from nerveseg_jax.configs import unet\n"
      f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
      "from test_train import smoke_config\n"
      "import jax; assert jax.device_count() == 1\n"
      f"c = smoke_config({str(data_dir)!r}, checkpoint_every_steps={STEPS},"
      f" eval_every_steps={STEPS})\n"
      f"r = train.train_and_evaluate(c, {str(tmp_path)!r})\n"
      "print('HISTORY=' + json.dumps([h['loss'] for h in r['history']]))\n")
  env = dict(SUBPROCESS_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                     text=True, timeout=300, cwd=REPO)
  assert p.returncode == 0, p.stderr[-3000:]
  one = json.loads(p.stdout.split("HISTORY=")[1].splitlines()[0])
  assert_same_curve(one, [h["loss"] for h in ref["history"]])


def _wait_for_checkpoint(proc, workdir, step, timeout=240):
  target = workdir / "checkpoints" / str(step)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (target / "commit_success.txt").exists() or (target / "_CHECKPOINT_METADATA").exists():
      return
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"run ended before checkpoint {step}: {err[-3000:]}")
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f"no checkpoint {step} after {timeout}s")


def _finish(proc, timeout=240):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("training subprocess timed out")
  return proc.returncode, out, err


def _start(data_dir, workdir):
  # NERVESEG_PARAMS_DIGEST: the run ends by hashing its parameters (compared below).
  return subprocess.Popen(cli_args(data_dir, workdir), cwd=REPO, text=True,
                          env=dict(SUBPROCESS_ENV, NERVESEG_PARAMS_DIGEST="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigterm_then_sigkill_resume_bitwise(data_dir, reference, tmp_path):
  """Preempted (SIGTERM), resumed, crashed (SIGKILL), resumed: same params as straight."""
  _, ref = reference
  proc = _start(data_dir, tmp_path)
  _wait_for_checkpoint(proc, tmp_path, 10)
  proc.send_signal(signal.SIGTERM)
  rc, out, err = _finish(proc)
  assert rc == 143, err[-3000:]  # 128 + SIGTERM, so schedulers requeue the job
  first = run_result(out)
  assert first["preempted"] == "True", "SIGTERM arrived after the run ended"
  stopped = int(first["step"])
  assert 10 <= stopped < STEPS and stopped in _steps(tmp_path)
  assert "SIGTERM: saved checkpoint at step" in err

  proc = _start(data_dir, tmp_path)
  _wait_for_checkpoint(proc, tmp_path, 20)
  proc.kill()
  proc.communicate(timeout=60)
  committed = _steps(tmp_path)
  # What a kill in the middle of a save leaves: a temporary directory, never a step.
  half = tmp_path / "checkpoints" / f"{committed[-1] + 10}.orbax-checkpoint-tmp"
  (half / "state").mkdir(parents=True, exist_ok=True)
  (half / "state" / "garbage").write_bytes(b"\0" * 64)

  rc, out, err = _finish(_start(data_dir, tmp_path))
  assert rc == 0, err[-3000:]
  last = run_result(out)
  assert int(last["start_step"]) == committed[-1] >= 20
  assert int(last["step"]) == STEPS
  assert last["params_sha256"] == ref["params_sha256"]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  """A NaN injected into the batch of step 4: the run stops naming the step, saves nothing bad."""
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  real = pipeline.TrainIterator

  class Poisoned(real):
    def __next__(self):
      step = self.step
      batch = super().__next__()
      if step == 4:
        batch = dict(batch, image=batch["image"] * np.float32("nan"))
      return batch

  monkeypatch.setattr(pipeline, "TrainIterator", Poisoned)
  # The reference config (same compiled step), saving after every step.
  cfg = smoke_config(data_dir, checkpoint_every_steps=1, **{"data.fold": -1})
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss nan at step 4 ") as e:
    train.train_and_evaluate(cfg, tmp_path)
  # Checkpoint k holds the state after steps 0..k-1: 4 is the last good one.
  assert _steps(tmp_path) and max(_steps(tmp_path)) == 4
  assert "last good checkpoint is step 4" in str(e.value)
  _, model = loading.load_model(tmp_path, which="latest")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_bfloat16_compute_trains(data_dir, tmp_path):
  cfg = smoke_config(data_dir, dtype="bfloat16", num_train_steps=3, checkpoint_every_steps=3,
                     **{"data.fold": -1})
  out = train.train_and_evaluate(cfg, tmp_path)
  assert np.isfinite(out["train_loss"]) and "val_kaggle_score" not in out
  _, model = loading.load_model(tmp_path, which="latest")
  assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {"float32"}


def test_missing_kaggle_download_is_one_message(tmp_path):
  p = subprocess.run(
      [sys.executable, "-m", "nerveseg_jax.train", "--config",
       str(REPO / "configs" / "unet.py") + ":smoke", "--config.data.source=kaggle",
       f"--workdir={tmp_path / 'w'}",
       f"--config.data.data_dir={tmp_path / 'tfds'}",
       f"--config.data.manual_dir={tmp_path / 'no_such_download.zip'}"],
      capture_output=True, text=True, timeout=120, cwd=REPO, env=SUBPROCESS_ENV)
  assert p.returncode != 0
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  assert "data.manual_dir" in p.stderr and "kaggle" in p.stderr.lower()
