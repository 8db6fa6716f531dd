"""Loading weights: a run's model for inference (best/latest), init_from by key."""

import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from nerveseg_jax import loading, train_state
from nerveseg_jax.checkpoint import flat_by_path, path_str
from nerveseg_jax.workdir import CheckpointMismatchError
from test_checkpoint import _config, _fresh_state, _write_run


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_load_model_takes_the_best_or_the_latest_weights(tmp_path):
  saved = _write_run(tmp_path, _config(), [0.9, 0.1, 0.2, None])
  for which, step in (("best", 1), ("latest", 4)):
    config, model = loading.load_model(tmp_path, which=which)
    assert config.model.features == 4
    params = nnx.state(model, nnx.Param).to_pure_dict()
    for a, b in zip(_leaves(params), _leaves(saved[step]), strict=True):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="which='worst'"):
    loading.load_model(tmp_path, which="worst")


def test_merge_nested():
  a = {"conv": {"kernel": 1}, "head": {"bias": 2}}
  b = {"conv": {"bn": {"mean": 3}}, "extra": 4}
  assert loading.merge_nested(a, b) == {"conv": {"kernel": 1, "bn": {"mean": 3}},
                                        "head": {"bias": 2}, "extra": 4}
  assert a == {"conv": {"kernel": 1}, "head": {"bias": 2}}  # inputs untouched


def test_mismatched_shapes_name_the_keys(tmp_path):
  _write_run(tmp_path, _config(features=4), [0.5])
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model"]["features"] = 8   # config.json edited by hand: shapes no longer fit
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointMismatchError, match=r"kernel.*checkpoint \(.*vs model"):
    loading.load_model(tmp_path)


def test_missing_workdir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    loading.load_model(tmp_path / "nope")
  (tmp_path / "config.json").write_text(_config().to_json_best_effort())
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    loading.load_model(tmp_path)


def _kernels(pure):
  """(keystr, array) of every 4-D kernel in a pure dict."""
  flat = jax.tree_util.tree_flatten_with_path(pure)[0]
  return [(path_str(k), v) for k, v in flat if np.ndim(v) == 4]


def test_init_from_partial_restore_by_key(tmp_path):
  cfg = _config()
  state, shardings = _fresh_state(cfg)
  full = loading.merge_nested(jax.device_get(state["params"]), jax.device_get(state["rest"]))
  # A "converted" checkpoint: values shifted by 1, an RGB stem, an extra top, a missing head.
  src = jax.tree.map(lambda x: np.asarray(x) + 1.0, full)
  stem_key, stem = _kernels(src)[0]
  assert stem.shape[2] == 1
  flat = flat_by_path(src)
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
  got = flat_by_path(loading.merge_nested(
      jax.device_get(new["params"]), jax.device_get(new["rest"])))
  orig = flat_by_path(full)
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
  with pytest.raises(CheckpointMismatchError, match=re.escape(bad_key)):
    train_state.apply_init_from(cfg, state, shardings)
  cfg.init_from = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="init_from"):
    train_state.apply_init_from(cfg, state, shardings)


def _save(path, tree):
  """What convert_keras writes: a StandardCheckpointer tree of numpy arrays."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)


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
  with pytest.raises(CheckpointMismatchError, match="is a training workdir"):
    train_state.apply_init_from(cfg, state, shardings)
  (tmp_path / "w.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
  cfg.init_from = str(tmp_path / "w.h5")
  with pytest.raises(CheckpointMismatchError, match=r"w\.h5 is a file.*convert_keras"):
    train_state.apply_init_from(cfg, state, shardings)
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "readme.txt").write_text("hi")
  cfg.init_from = str(tmp_path / "plain")
  with pytest.raises(CheckpointMismatchError,
                     match=r"plain is not a readable Orbax checkpoint"):
    train_state.apply_init_from(cfg, state, shardings)
