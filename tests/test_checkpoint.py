"""The train checkpointer: retention, best/latest by Orbax, half-written steps, mismatched models."""

import functools
import math

import jax
import numpy as np
import pytest

from nerveseg_jax import checkpoint, sharding, train, train_state
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.configs import unet


def _config(features=4):
  c = unet.get_config("smoke")
  c.model.features = features
  return c


@functools.lru_cache(maxsize=None)
def _fresh_state_cached(features):
  config = _config(features)
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = train_state.make_optimizer(config)
  return train_state.init_state(config, tx, mesh)


def _fresh_state(config):
  """The train state of a smoke U-Net (arrays are immutable, so one per width is shared)."""
  return _fresh_state_cached(int(config.model.features))


def _write_run(workdir, config, scores):
  """A workdir as train leaves it: config.json and one checkpoint per score."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  state, _ = _fresh_state(config)
  ckpt = checkpoint.TrainCheckpointer(workdir, keep=2)
  saved = {}
  for step, score in enumerate(scores, start=1):
    state = dict(state, params=jax.tree.map(lambda p, s=step: p + s, state["params"]))
    metrics = None if score is None else {"kaggle_score": score}
    ckpt.save(step, state, {"step": step, "seed": 0, "best_metric": "kaggle_score",
                            "metrics": metrics or {}}, metrics=metrics)
    saved[step] = jax.device_get(state["params"])
  ckpt.close()
  return saved


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_retention_and_best_and_latest(tmp_path):
  _write_run(tmp_path, _config(), [0.9, 0.1, 0.2, None])
  # keep=2 latest (3, 4) plus the best-scored (1); step 2 is gone.
  assert _steps(tmp_path) == [1, 3, 4]
  assert checkpoint.select_step(tmp_path, "best") == 1
  assert checkpoint.select_step(tmp_path, "latest") == 4
  with pytest.raises(ValueError, match="which='worst'"):
    checkpoint.select_step(tmp_path, "worst")


def _save_tiny(workdir, metrics_by_step, keep=10):
  """Steps of a tiny state, each saved with its validation metrics (or None), and a
  meta that names no metric: the ranking comes from Orbax's own step metrics."""
  ckpt = checkpoint.TrainCheckpointer(workdir, keep=keep)
  for step, metrics in enumerate(metrics_by_step, start=1):
    ckpt.save(step, {"w": np.full(2, step, np.float32)}, {"step": step}, metrics=metrics)
  ckpt.close()


@pytest.mark.parametrize("metrics_by_step, best", [
    # A segmentation run ranks by the Kaggle score, not by its presence accuracy.
    ([{"kaggle_score": 0.2, "presence_accuracy": 0.9},
      {"kaggle_score": 0.8, "presence_accuracy": 0.1}, None], 2),
    # A classifier has no Kaggle score: presence accuracy ranks it.
    ([{"presence_accuracy": 0.7, "loss": 0.1}, {"presence_accuracy": 0.6, "loss": 0.0}], 1),
    # Equal scores: the later step.
    ([{"kaggle_score": 0.5}, {"kaggle_score": 0.5}, {"kaggle_score": 0.4}], 2),
    # Nothing scored (no validation, or a non-finite score): the latest.
    ([None, None, None], 3),
    ([{"kaggle_score": float("nan")}, {"loss": 1.0}, None], 3),
])
def test_best_is_orbaxs_best_step_by_validation_score(tmp_path, metrics_by_step, best):
  _save_tiny(tmp_path, metrics_by_step)
  assert checkpoint.select_step(tmp_path, "best") == best
  assert checkpoint.select_step(tmp_path, "latest") == len(metrics_by_step)


def test_the_best_step_outlives_the_latest_ones(tmp_path):
  _save_tiny(tmp_path, [{"kaggle_score": 0.9}, {"kaggle_score": 0.1}, None,
                        {"kaggle_score": float("nan")}, None], keep=1)
  assert _steps(tmp_path) == [1, 5]
  assert checkpoint.select_step(tmp_path, "best") == 1


def test_validation_score():
  assert checkpoint.validation_score({"kaggle_score": 0.3, "presence_accuracy": 0.9}) == 0.3
  assert checkpoint.validation_score({"presence_accuracy": 0.9}) == 0.9
  for unscored in (None, {}, {"loss": 0.1}, {"kaggle_score": float("inf")},
                   {"kaggle_score": float("nan"), "presence_accuracy": 0.9}):
    assert checkpoint.validation_score(unscored) == -math.inf


def test_no_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*checkpoints: train first"):
    checkpoint.select_step(tmp_path, "best")
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint.select_step(tmp_path, "latest")


def test_half_written_checkpoint_is_ignored(tmp_path):
  _write_run(tmp_path, _config(), [0.5, 0.6])
  # What a save killed mid-write leaves behind (Orbax renames on success only).
  tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\0" * 100)
  ckpt = checkpoint.TrainCheckpointer(tmp_path, keep=2)
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert checkpoint.select_step(tmp_path, "latest") == 2


def test_mismatched_config_is_refused_before_anything_changes(tmp_path):
  _write_run(tmp_path, _config(features=4), [0.5])
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"model.features: checkpoint 4 vs config 8"):
    train.train_and_evaluate(_config(features=8), tmp_path)
  assert (tmp_path / "config.json").read_text() == before
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_remote_workdirs_keep_their_scheme(tmp_path, monkeypatch):
  # gs://bucket/run must not collapse to gs:/bucket/run (what pathlib would make of it).
  from nerveseg_jax.workdir import as_path
  assert str(as_path("gs://bucket/runs/unet")) == "gs://bucket/runs/unet"
  monkeypatch.chdir(tmp_path)
  assert str(as_path("runs/x")) == str(tmp_path / "runs" / "x")


def _untouched(workdir, config_json):
  """Asserts what a refused run must leave: the same config.json (or none), steps, no logs."""
  assert (workdir / "config.json").exists() == (config_json is not None)
  if config_json is not None:
    assert (workdir / "config.json").read_text() == config_json
  assert workdir_lib.checkpoint_steps(workdir) == [1]
  assert not list(workdir.glob("events.out.tfevents*"))


def test_checkpoint_of_another_model_without_config_json(tmp_path_factory, tmp_path):
  """A workdir whose config.json is gone: the restore itself names the keys, nothing changes."""
  from test_train import smoke_data_dir  # pylint: disable=g-import-not-at-top
  data_dir = smoke_data_dir(tmp_path_factory)
  _write_run(tmp_path, _config(features=4), [0.5])
  (tmp_path / "config.json").unlink()
  cfg = _config(features=8)
  cfg.data.data_dir = str(data_dir)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"(?s)does not match the checkpoint .*checkpoints/1.*kernel: "
                           r"checkpoint \(.*vs model"):
    train.train_and_evaluate(cfg, tmp_path)
  _untouched(tmp_path, None)
  # Same model, but gradient clipping switched off: the optimizer state has one stage
  # less. Orbax's structure error comes back naming the checkpoint and the likely key.
  cfg = _config(features=4)
  cfg.data.data_dir = str(data_dir)
  cfg.grad_clip_norm = 0.0
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"(?s)checkpoints/1 .*grad_clip_norm.*opt_state"):
    train.train_and_evaluate(cfg, tmp_path)
  _untouched(tmp_path, None)


def test_clipping_switched_off_is_refused_by_name(tmp_path):
  _write_run(tmp_path, _config(), [0.5])
  before = (tmp_path / "config.json").read_text()
  cfg = _config()
  cfg.grad_clip_norm = 0.0
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"grad_clip_norm: checkpoint 1.0 vs config 0.0"):
    train.train_and_evaluate(cfg, tmp_path)
  _untouched(tmp_path, before)
  cfg.grad_clip_norm = 5.0  # another threshold is the same optimizer state: allowed
  workdir_lib.check_model_config(tmp_path, cfg)


def test_config_json_without_checkpoints_does_not_bind_the_workdir(tmp_path):
  # A run that stopped before its first save: another model may use the workdir.
  (tmp_path / "config.json").write_text(_config(features=4).to_json_best_effort())
  workdir_lib.check_model_config(tmp_path, _config(features=8))
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
  workdir_lib.check_model_config(tmp_path, _config(features=8))
  assert workdir_lib.checkpoint_steps(tmp_path) == []
