"""evaluate: source-resolution scoring, calibration never lowers the score, outputs."""

import json
import shutil

import numpy as np
import pytest

from nerveseg_jax import evaluate, postprocess


@pytest.fixture(scope="module")
def run_root(smoke_run):
  return smoke_run


@pytest.fixture(scope="module")
def val_eval(calibrated_run):
  """A copy of the run after `python -m nerveseg_jax.evaluate --workdir DIR` (val fold)."""
  return calibrated_run


def test_validation_metrics_and_calibration(val_eval):
  out = json.loads((val_eval / "eval" / "metrics.json").read_text())
  m, before = out["metrics"], out["before_calibration"]
  for key in ("kaggle_score", "dice_nerve_frames", "presence_precision", "presence_recall"):
    assert key in m and key in before
  c = m["confusion"]
  assert sum(c.values()) == m["num_frames"] > 0
  assert c["true_positive"] + c["false_negative"] == m["num_nerve_frames"]
  # Calibration never lowers the validation score; the calibrated settings are saved.
  assert m["kaggle_score"] >= before["kaggle_score"] - 1e-9
  cal = postprocess.load_calibration(val_eval)
  assert cal is not None and cal.to_dict() == out["calibration"]
  saved = json.loads((val_eval / "calibration.json").read_text())["scores"]
  np.testing.assert_allclose(saved["after"], m["kaggle_score"], atol=1e-6)
  np.testing.assert_allclose(saved["before"], before["kaggle_score"], atol=1e-6)
  # Per-frame rows and the report are written.
  rows = (val_eval / "eval" / "per_frame.csv").read_text().splitlines()
  assert len(rows) == m["num_frames"] + 1
  page = (val_eval / "eval" / "report.html").read_text()
  assert "Worst frames" in page and "Dice per frame" in page


def test_evaluated_score_is_the_project_dice_at_source_size(val_eval):
  """Recompute per_frame.csv's Dice from the masks the predictor writes at source size."""
  from nerveseg_jax import checkpoint, inference, metrics
  config = checkpoint.read_config(val_eval)
  frames = list(evaluate._dataset_frames(config.data, "val"))
  assert all(f.image.shape == (420, 580) for f in frames)   # source, not training, size
  predictor = inference.Predictor(val_eval)                 # reads calibration.json
  results = predictor.predict([f.image for f in frames], [f.name for f in frames])
  dice = np.array([float(metrics.dice_per_example(r.mask[None], f.truth[None])[0])
                   for r, f in zip(results, frames)])
  out = json.loads((val_eval / "eval" / "metrics.json").read_text())
  np.testing.assert_allclose(dice.mean(), out["metrics"]["kaggle_score"], atol=1e-6)


def test_other_split_uses_saved_calibration(val_eval):
  out = evaluate.run(val_eval, split="train")
  assert out["calibration"] == postprocess.load_calibration(val_eval).to_dict()
  assert (val_eval / "eval" / "train" / "metrics.json").exists()
  assert "before_calibration" not in out


def test_labelled_folder_of_other_sizes(val_eval, shared_data, tmp_path):
  """A user's folder: 256x256 RGB JPEGs with lossy masks (the real-data subset)."""
  src = shared_data / "nerve_real_subset"
  names = sorted(p.stem for p in (src / "images").glob("*.jpg"))[:3]
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  for name in names:
    shutil.copy(src / "images" / f"{name}.jpg", tmp_path / "images")
    shutil.copy(src / "masks" / f"{name}_mask.jpg", tmp_path / "masks")
  out = evaluate.run(val_eval, folder=str(tmp_path))
  assert out["metrics"]["num_frames"] == 3 and out["metrics"]["num_nerve_frames"] == 3
  assert 0.0 <= out["metrics"]["kaggle_score"] <= 1.0
  (tmp_path / "masks" / f"{names[-1]}_mask.jpg").unlink()
  with pytest.raises(ValueError, match=f"{names[-1]}.jpg"):
    evaluate.run(val_eval, folder=str(tmp_path))


def test_test_split_scores_with_synthetic_truth_or_says_why(val_eval, run_root, tmp_path):
  out = evaluate.run(val_eval, split="test")
  assert out["metrics"]["num_frames"] == len(list((run_root / "raw" / "test").glob("*.tif")))
  from nerveseg_jax import checkpoint
  config = checkpoint.read_config(val_eval)
  config.data.manual_dir = str(tmp_path)        # a tree without test_truth.csv
  with pytest.raises(ValueError, match="unlabelled.*test_truth.csv"):
    evaluate._find_test_truth(config.data)
