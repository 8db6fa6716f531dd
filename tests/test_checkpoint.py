"""Checkpoints: best/latest, half-written steps, mismatched models, init_from by key."""

import functools
import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

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
  ckpt = checkpoint.TrainCheckpointer(workdir, keep=2, best_metric="kaggle_score")
  saved = {}
  for step, score in enumerate(scores, start=1):
    state = dict(state, params=jax.tree.map(lambda p, s=step: p + s, state["params"]))
    metrics = None if score is None else {"kaggle_score": score}
    ckpt.save(step, state, {"step": step, "seed": 0, "best_metric": "kaggle_score",
                            "metrics": metrics or {}}, metrics=metrics)
    saved[step] = jax.device_get(state["params"])
  ckpt.close()
  return saved


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_best_and_latest_and_retention(tmp_path):
  cfg = _config()
  saved = _write_run(tmp_path, cfg, [0.9, 0.1, 0.2, None])
  # keep=2 latest (3, 4) plus the best-scored (1); step 2 is gone.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [1, 3, 4]
  for which, step in (("best", 1), ("latest", 4)):
    config, model = checkpoint.load_model(tmp_path, which=which)
    assert config.model.features == 4
    params = nnx.state(model, nnx.Param).to_pure_dict()
    for a, b in zip(_leaves(params), _leaves(saved[step])):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="which='worst'"):
    checkpoint.load_model(tmp_path, which="worst")


def test_half_written_checkpoint_is_ignored(tmp_path):
  _write_run(tmp_path, _config(), [0.5, 0.6])
  # What a save killed mid-write leaves behind (Orbax renames on success only).
  tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\0" * 100)
  ckpt = checkpoint.TrainCheckpointer(tmp_path, keep=2, best_metric="kaggle_score")
  assert ckpt.latest_step() == 2
  ckpt.close()
  checkpoint.load_model(tmp_path, which="latest")


def test_mismatched_config_is_refused_before_anything_changes(tmp_path):
  _write_run(tmp_path, _config(features=4), [0.5])
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"model.features: checkpoint 4 vs config 8"):
    train.train_and_evaluate(_config(features=8), tmp_path)
  assert (tmp_path / "config.json").read_text() == before
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_mismatched_shapes_name_the_keys(tmp_path):
  _write_run(tmp_path, _config(features=4), [0.5])
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model"]["features"] = 8   # config.json edited by hand: shapes no longer fit
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"kernel.*checkpoint \(.*vs model"):
    checkpoint.load_model(tmp_path)


def test_missing_workdir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    checkpoint.load_model(tmp_path / "nope")
  (tmp_path / "config.json").write_text(_config().to_json_best_effort())
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load_model(tmp_path)


def _kernels(pure):
  """(keystr, array) of every 4-D kernel in a pure dict."""
  flat = jax.tree_util.tree_flatten_with_path(pure)[0]
  return [(checkpoint.path_str(k), v) for k, v in flat if np.ndim(v) == 4]


def test_init_from_partial_restore_by_key(tmp_path):
  cfg = _config()
  state, shardings = _fresh_state(cfg)
  full = checkpoint.merge_nested(jax.device_get(state["params"]), jax.device_get(state["rest"]))
  # A "converted" checkpoint: values shifted by 1, an RGB stem, an extra top, a missing head.
  src = jax.tree.map(lambda x: np.asarray(x) + 1.0, full)
  stem_key, stem = _kernels(src)[0]
  assert stem.shape[2] == 1
  flat = checkpoint.flat_by_path(src)
  rgb = np.concatenate([stem, stem * 2, stem * 3], axis=2)
  last_key = sorted(flat)[-1]
  def rebuild(tree, path=""):
    out = {}
    for k, v in tree.items():
      p = f"{path}/{k}" if path else str(k)
      if isinstance(v, dict):
        out[k] = rebuild(v, p)
      elif p == stem_key:
        out[k] = rgb
      elif p != last_key:
        out[k] = v
    return out
  src = rebuild(src)
  src["imagenet_top"] = {"kernel": np.ones((1536, 1000), np.float32)}
  _save(tmp_path / "converted", src)
  cfg.init_from = str(tmp_path / "converted")
  new = train_state.apply_init_from(cfg, state, shardings)
  got = checkpoint.flat_by_path(checkpoint.merge_nested(
      jax.device_get(new["params"]), jax.device_get(new["rest"])))
  orig = checkpoint.flat_by_path(full)
  np.testing.assert_allclose(got[stem_key], (stem * 6), rtol=1e-6)  # summed over RGB
  np.testing.assert_array_equal(got[last_key], orig[last_key])      # head kept at init
  other = [k for k in got if k not in (stem_key, last_key)]
  for k in other:
    np.testing.assert_allclose(got[k], orig[k] + 1.0, rtol=1e-6)
  # A key that does not fit is named.
  bad = jax.tree.map(lambda x: x, src)
  bad_key, bad_val = _kernels(src)[1]
  def put(tree, keys, value):
    node = tree
    key = lambda n, k: int(k) if k not in n and k.isdigit() else k
    for k in keys[:-1]:
      node = node[key(node, k)]
    node[key(node, keys[-1])] = value
  put(bad, bad_key.split("/"),
      np.zeros(bad_val.shape[:3] + (bad_val.shape[3] + 1,), np.float32))
  _save(tmp_path / "bad", bad)
  cfg.init_from = str(tmp_path / "bad")
  with pytest.raises(checkpoint.CheckpointMismatchError, match=re.escape(bad_key)):
    train_state.apply_init_from(cfg, state, shardings)
  cfg.init_from = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="init_from"):
    train_state.apply_init_from(cfg, state, shardings)


def _save(path, tree):
  """What convert_keras writes: a StandardCheckpointer tree of numpy arrays."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)


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


def test_init_from_a_training_checkpoint_and_bad_paths(tmp_path):
  cfg = _config()
  saved = _write_run(tmp_path / "run", cfg, [0.5])
  state, shardings = _fresh_state(cfg)
  # The state item of a training checkpoint: its params (and batch statistics) are used.
  cfg.init_from = str(tmp_path / "run" / "checkpoints" / "1" / "state")
  new = train_state.apply_init_from(cfg, state, shardings)
  for a, b in zip(_leaves(new["params"]), _leaves(saved[1]), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(new["rest"]), _leaves(state["rest"]), strict=True):
    np.testing.assert_array_equal(a, b)  # saved with the fresh statistics
  # A workdir, a Keras file given directly, and a directory that is no checkpoint.
  cfg.init_from = str(tmp_path / "run")
  with pytest.raises(checkpoint.CheckpointMismatchError, match="is a training workdir"):
    train_state.apply_init_from(cfg, state, shardings)
  (tmp_path / "w.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
  cfg.init_from = str(tmp_path / "w.h5")
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"w\.h5 is a file.*convert_keras"):
    train_state.apply_init_from(cfg, state, shardings)
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "readme.txt").write_text("hi")
  cfg.init_from = str(tmp_path / "plain")
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"plain is not a readable Orbax checkpoint"):
    train_state.apply_init_from(cfg, state, shardings)
