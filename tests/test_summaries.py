"""TensorBoard beyond scalars: the validation panel, the config as hparams, evaluate's
metrics. The event files are read back with TensorFlow's summary iterator."""

import collections
import pathlib

import numpy as np

from nerveseg_jax import summaries


def _events(workdir: pathlib.Path) -> dict[str, list[int]]:
  """tag -> steps it was written at, over every event file of the workdir (not nested)."""
  import tensorflow as tf
  tags: dict[str, list[int]] = collections.defaultdict(list)
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        tags[value.tag].append(int(event.step))
  return tags


def _image_values(workdir: pathlib.Path, tag: str) -> list[np.ndarray]:
  import tensorflow as tf
  out = []
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == tag:
          # tf.summary.image stores [width, height, png bytes...] as a string tensor.
          png = tf.make_ndarray(value.tensor)[2]
          out.append(tf.io.decode_png(png).numpy())
  return out


def test_panel_rows_are_fixed_by_id_and_mix_nerve_and_empty_frames():
  ids = np.array([f"{s}_{f}" for s in (1, 2) for f in range(1, 11)])
  has_nerve = np.array([i % 3 == 0 for i in range(len(ids))])
  rows = summaries.panel_rows(ids, has_nerve, k=4)
  assert len(rows) == 4 and len(set(rows.tolist())) == 4
  assert has_nerve[rows].sum() == 3                          # 3 with a nerve, 1 without
  # The same frames whatever the array order (arrays are rebuilt on every resume).
  perm = np.random.default_rng(0).permutation(len(ids))
  again = summaries.panel_rows(ids[perm], has_nerve[perm], k=4)
  assert sorted(ids[perm][again]) == sorted(ids[rows])
  # Only empty frames (or only nerve frames): the panel is still full.
  assert len(summaries.panel_rows(ids, np.zeros(len(ids), bool), k=4)) == 4
  assert len(summaries.panel_rows(ids[:2], np.ones(2, bool), k=4)) == 2


def test_panel_image_shows_frame_truth_and_prediction():
  h, w = 32, 48
  image = np.full((h, w, 1), 90, np.uint8)
  truth = np.zeros((h, w, 1), np.uint8)
  truth[12:24, 18:34] = 1
  prob = np.zeros((h, w), np.float32)
  prob[12:24, 18:30] = 0.9
  panel = summaries.panel_image(image, truth, prob, presence=0.8)
  scale = -(-256 // w)
  assert panel.shape == (h * scale, 3 * w * scale + 8, 3) and panel.dtype == np.uint8
  tiles = [panel[:, i * (w * scale + 4):i * (w * scale + 4) + w * scale] for i in range(3)]
  yellow = lambda t: np.all(t == (255, 220, 0), axis=-1).sum()
  green = lambda t: np.all(t == (0, 255, 0), axis=-1).sum()
  assert yellow(tiles[0]) == 0 and green(tiles[0]) == 0      # the frame alone
  assert yellow(tiles[1]) > 0 and green(tiles[1]) == 0       # ground truth outline
  assert green(tiles[2]) > 0 and yellow(tiles[2]) == 0       # predicted outline


def test_flat_hparams_are_scalars_with_dotted_keys():
  import ml_collections
  config = ml_collections.ConfigDict(dict(
      seed=3, learning_rate=1e-3, data=dict(image_size=(128, 176), augment=dict(enabled=True)),
      init_from=None))
  flat = summaries.flat_hparams(config)
  assert flat == {"seed": 3, "learning_rate": 1e-3, "data.image_size": "(128, 176)",
                  "data.augment.enabled": True, "init_from": "None"}


def test_training_writes_panel_of_the_same_frames_and_hparams(smoke_run):
  """The conftest smoke run: evaluated at steps 75 and 150."""
  workdir = smoke_run / "workdir"
  tags = _events(workdir)
  panel = sorted(t for t in tags if t.startswith("val_frames/"))
  assert len(panel) == summaries.PANEL_FRAMES, sorted(tags)
  val_steps = sorted(set(tags["val/kaggle_score"]))
  assert len(val_steps) >= 2
  for tag in panel:                                          # every frame, every evaluation
    assert sorted(tags[tag]) == val_steps, (tag, tags[tag])
  images = _image_values(workdir, panel[0])
  assert len(images) == len(val_steps) and images[0].shape[-1] == 3
  assert images[0].shape[1] > 2 * images[0].shape[0]        # three tiles side by side
  assert "_hparams_/session_start_info" in tags


def test_evaluate_writes_its_metrics_to_the_runs_tensorboard(calibrated_run):
  import json
  out = json.loads((calibrated_run / "eval" / "metrics.json").read_text())
  tags = _events(calibrated_run)
  step = out["checkpoint_step"]
  assert tags["eval/val/kaggle_score"] == [step]
  assert tags["eval/val/before_calibration/kaggle_score"] == [step]
  assert tags["eval/val/true_positive"] == [step]
  assert "val/kaggle_score" in tags                          # beside training's own


def test_evaluation_scalars_name_split_and_leave_out_undefined_ratios():
  metrics = dict(kaggle_score=0.7, dice_nerve_frames=None, presence_precision=0.5,
                 presence_recall=None, confusion=dict(true_positive=1), num_frames=4,
                 num_nerve_frames=0)
  out = dict(source="folder /data/my frames", metrics=metrics, classifier_workdir=None)
  scalars = summaries.evaluation_scalars(out)
  assert scalars == {"eval/folder_my frames/kaggle_score": 0.7,
                     "eval/folder_my frames/presence_precision": 0.5,
                     "eval/folder_my frames/true_positive": 1.0,
                     "eval/folder_my frames/num_frames": 4.0,
                     "eval/folder_my frames/num_nerve_frames": 0.0}
  out = dict(source="split test", metrics=metrics, classifier_workdir="/runs/cls",
             before_calibration=dict(kaggle_score=0.6))
  scalars = summaries.evaluation_scalars(out)
  assert scalars["eval/test_with_classifier/before_calibration/kaggle_score"] == 0.6
