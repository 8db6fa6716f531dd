"""`train` on a synthetic set that is already built imports neither TensorFlow nor TFDS
(its cache is found through tfds_source.ready_build, its TensorBoard files are written by
summaries.EventWriter), and that way in gives way to TFDS on any change."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nerveseg_jax.configs import unet
from nerveseg_jax.data import arrays as data_arrays
from nerveseg_jax.data import tfds_source
from conftest import REPO, import_probe

SIZE = (32, 48)

_PROBE = import_probe("nerveseg_jax.train", ("tensorflow", "tensorflow_datasets"))


def _config(data_dir):
  c = unet.get_config("smoke")
  c.data.data_dir = str(data_dir)
  c.data.synthetic_subjects, c.data.synthetic_frames = 4, 6
  c.data.image_size = SIZE
  return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A smoke set generated, built and cached once, through TFDS (this process). A test
  that changes it leaves it built and cached again."""
  data_dir = tmp_path_factory.mktemp("no_tf") / "data"
  data_arrays.load_arrays(_config(data_dir).data, "train")
  return data_dir


def _events(workdir) -> tuple[dict[str, list[int]], dict[str, object]]:
  """(tag -> steps written, tag -> last value) over the workdir's event files, read
  back with TensorFlow's own reader: texts as str, images decoded from their PNG."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  steps, last = collections.defaultdict(list), {}
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        steps[value.tag].append(int(event.step))
        plugin = value.metadata.plugin_data.plugin_name
        if plugin == "text":
          last[value.tag] = tf.make_ndarray(value.tensor).reshape(-1)[0].decode()
        elif plugin == "images":  # tf.summary.image's [width, height, png]
          last[value.tag] = tf.io.decode_png(tf.make_ndarray(value.tensor)[2]).numpy()
        elif plugin == "scalars":
          last[value.tag] = float(tf.make_ndarray(value.tensor))
  return steps, last


def test_smoke_training_on_a_built_synthetic_set_imports_no_tensorflow(built, tmp_path):
  workdir = tmp_path / "run"
  res = subprocess.run(
      [sys.executable, "-c", _PROBE, "--config", "configs/unet.py:smoke",
       "--workdir", str(workdir), f"--config.data.data_dir={built}",
       "--config.data.synthetic_frames=6", f"--config.data.image_size={SIZE}",
       "--config.num_train_steps=2", "--config.log_every_steps=1",
       "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
       "--config.data.augment.enabled=False"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
  assert res.returncode == 0, res.stderr[-3000:]
  imported = json.loads(res.stdout.split("IMPORTED ")[1])
  assert imported == {"tensorflow": False, "tensorflow_datasets": False}
  # What TensorBoard shows is all there: curves, validation, panel, hparams, compile text.
  steps, last = _events(workdir)
  assert steps["train/loss"] == [1, 2] and steps["val/kaggle_score"] == [2]
  assert np.isfinite(last["train/loss"])
  panel = [t for t in steps if t.startswith("val_frames/")]
  assert panel and steps[panel[0]] == [2]
  assert last[panel[0]].dtype == np.uint8 and last[panel[0]].shape[-1] == 3
  assert last["compile/train_step"].startswith("compiled train_step in ")
  assert "_hparams_/session_start_info" in steps
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1


def test_ready_cache_is_the_tfds_paths_own_and_gives_way_to_any_change(built, monkeypatch):
  cfg = _config(built).data
  found = data_arrays._ready_cache(cfg, "train", SIZE)
  assert found is not None
  builder = tfds_source.build(cfg)
  path = data_arrays._cache_root(builder) / data_arrays._cache_key(
      "train", SIZE, data_arrays._dataset_fingerprint(builder))
  assert found[0] == path and path.is_dir()
  # Another size was never cached: TFDS resizes it.
  assert data_arrays._ready_cache(cfg, "train", (16, 24)) is None
  # Other builder code: back through TFDS.
  monkeypatch.setattr(tfds_source, "_builder_digest", lambda: "another builder")
  assert tfds_source.ready_build(cfg) is None
  monkeypatch.undo()
  # A frame of the tree touched: back through TFDS, which rebuilds; then ready again.
  raw = tfds_source.raw_tree(cfg)
  frame = next((raw / "train").glob("*_mask.tif"))
  st = frame.stat()
  os.utime(frame, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert tfds_source.ready_build(cfg) is None
  via_tfds = data_arrays.load_arrays(cfg, "train")
  found = data_arrays._ready_cache(cfg, "train", SIZE)
  assert found is not None and found[0] != path              # the new build's own key

  def no_tfds(*args, **kwargs):
    raise AssertionError("went through TFDS")

  monkeypatch.setattr(tfds_source, "build", no_tfds)
  via_ready = data_arrays.load_arrays(cfg, "train")
  assert via_ready.id.tolist() == via_tfds.id.tolist()
  np.testing.assert_array_equal(via_ready.image, via_tfds.image)
  np.testing.assert_array_equal(via_ready.mask, via_tfds.mask)
