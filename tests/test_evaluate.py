"""evaluate: source-resolution scoring, calibration never lowers the score, outputs."""

import csv
import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest

from nerveseg_jax import evaluate, postprocess
from nerveseg_jax.data import labelled
from nerveseg_jax import workdir as workdir_lib


@pytest.fixture(scope="module")
def run_root(smoke_run):
  return smoke_run


@pytest.fixture(scope="module")
def val_eval(calibrated_run, tmp_path_factory):
  """A copy of the run after `python -m nerveseg_jax.evaluate --workdir DIR` (val fold).

  These tests write more evaluations into it; the copy keeps the session's run (read by
  other test files, perhaps in another xdist worker at the same time) as it is.
  """
  workdir = tmp_path_factory.mktemp("val_eval") / "workdir"
  shutil.copytree(calibrated_run, workdir)
  return workdir


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
  from nerveseg_jax import inference, metrics
  config = workdir_lib.read_config(val_eval)
  frames = list(labelled.dataset_frames(config.data, "val"))
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
  config = workdir_lib.read_config(val_eval)
  config.data.manual_dir = str(tmp_path)        # a tree without test_truth.csv
  with pytest.raises(ValueError, match="unlabelled.*test_truth.csv"):
    labelled.find_test_truth(config.data)


def test_summarize_by_hand():
  # 6 frames: 3 with a nerve (Dice 0.8, 0.0 missed, 0.5), 3 empty (1 false alarm).
  dice = [0.8, 0.0, 0.5, 1.0, 0.0, 1.0]
  found = [True, False, True, False, True, False]
  nerve = [True, True, True, False, False, False]
  m = evaluate.summarize(dice, found, nerve)
  assert m["kaggle_score"] == pytest.approx(3.3 / 6)
  assert m["dice_nerve_frames"] == pytest.approx(1.3 / 3)
  assert m["presence_precision"] == pytest.approx(2 / 3)    # 2 of 3 "found" had a nerve
  assert m["presence_recall"] == pytest.approx(2 / 3)       # 2 of 3 nerves found
  assert m["confusion"] == dict(true_positive=2, false_positive=1, false_negative=1,
                                true_negative=2)
  assert (m["num_frames"], m["num_nerve_frames"]) == (6, 3)
  # Undefined ratios are None, not a division error or a made-up 0.
  m = evaluate.summarize([1.0, 1.0], [False, False], [False, False])
  assert m["presence_precision"] is None and m["presence_recall"] is None
  assert m["dice_nerve_frames"] is None and m["kaggle_score"] == 1.0


def test_printed_table_shows_before_and_after(val_eval):
  out = json.loads((val_eval / "eval" / "metrics.json").read_text())
  out["output_dir"] = str(val_eval / "eval")
  table = evaluate.format_table(out)
  header = table.splitlines()[1].split()
  assert header == ["default", "calibrated"]
  row = next(line for line in table.splitlines() if line.startswith("kaggle_score"))
  before, after = (float(x) for x in row.split()[1:])
  assert before == pytest.approx(out["before_calibration"]["kaggle_score"], abs=1e-4)
  assert after == pytest.approx(out["metrics"]["kaggle_score"], abs=1e-4)
  tp = next(line for line in table.splitlines() if line.startswith("true_positive"))
  assert int(tp.split()[2]) == out["metrics"]["confusion"]["true_positive"]


def test_config_flag_overrides_the_workdirs_config(val_eval, tmp_path):
  """--config FILE:ARG: here a config whose validation fold is another one."""
  workdir = tmp_path / "workdir"
  shutil.copytree(val_eval, workdir)
  config = workdir_lib.read_config(workdir)
  other_fold = (int(config.data.fold) + 1) % int(config.data.num_folds)
  cfg_file = tmp_path / "other_fold.py"
  cfg_file.write_text(
      "import json, ml_collections\n"
      "def get_config(arg):\n"
      f"  c = ml_collections.ConfigDict(json.load(open({str(workdir / 'config.json')!r})))\n"
      "  c.data.fold = int(arg)\n"
      "  return c\n")
  assert evaluate.main(["--workdir", str(workdir), "--config", f"{cfg_file}:{other_fold}",
                        "--no_calibrate"]) == 0
  with open(workdir / "eval" / "per_frame.csv", newline="") as f:
    scored = {r["name"] for r in csv.DictReader(f)}
  config.data.fold = other_fold
  assert scored == labelled.split_ids(config.data, "val")
  config.data.fold = other_fold - 1 if other_fold else int(config.data.num_folds) - 1
  assert scored != labelled.split_ids(config.data, "val")
  assert evaluate.main(["--workdir", str(workdir), "--config", str(tmp_path / "no.py")]) == 2


def test_unreadable_frames_in_a_folder_are_named_and_the_rest_scored(val_eval, run_root,
                                                                      tmp_path, capsys):
  """Kaggle's flat layout; one corrupt frame and one corrupt mask."""
  from nerveseg_jax import imageio, rle
  with open(run_root / "raw" / "test_truth.csv", newline="") as f:
    truth = {r["img"]: r["pixels"] for r in csv.DictReader(f)}
  names = sorted(truth, key=int)[:5]
  for n in names:
    frame = imageio.read_gray(run_root / "raw" / "test" / f"{n}.tif")
    shutil.copy(run_root / "raw" / "test" / f"{n}.tif", tmp_path)
    imageio.write_png(tmp_path / f"{n}_mask.png",
                      imageio.mask_png(rle.decode(truth[n], *frame.shape)))
  data = (tmp_path / f"{names[0]}.tif").read_bytes()
  (tmp_path / f"{names[0]}.tif").write_bytes(data[:len(data) // 3])
  (tmp_path / f"{names[1]}_mask.png").write_bytes(b"not a png")
  assert evaluate.main(["--workdir", str(val_eval), "--folder", str(tmp_path)]) == 1
  printed = capsys.readouterr().out
  assert f"SKIPPED {tmp_path / names[0]}.tif" in printed
  assert f"{names[1]}_mask.png" in printed
  out = json.loads((val_eval / "eval" / f"folder_{tmp_path.name}" / "metrics.json").read_text())
  assert out["metrics"]["num_frames"] == 3
  assert sorted(pathlib.Path(s["file"]).name for s in out["skipped"]) == sorted(
      [f"{names[0]}.tif", f"{names[1]}.tif"])


def test_presence_only_search_keeps_the_mask_settings_and_never_lowers_the_score():
  """postprocess.search_presence (evaluate --classifier_workdir) on hand-made frames."""
  rng = np.random.default_rng(0)
  stats = postprocess.FrameStats((0.5,))
  truths = []
  for k in range(8):
    truth = np.zeros((20, 30), np.uint8)
    if k % 2:
      truth[5:12, 8:20] = 1
    prob = np.clip(truth * 0.8 + rng.uniform(0, 0.3, truth.shape), 0, 1)
    # The classifier's presence on nerve frames (0.3) passes only thresholds below 0.5.
    stats.add(prob, 0.3 if k % 2 else 0.05, truth)
    truths.append(truth)
  base = postprocess.Calibration(min_area=10)
  result = postprocess.search_presence(stats, base)
  assert result.default_score == pytest.approx(stats.per_frame_dice(base).mean())
  assert result.default_score == pytest.approx(0.5)                # all empty at 0.5
  assert result.score == pytest.approx(1.0) and result.score > result.default_score
  assert result.calibration.presence_threshold < 0.3
  assert dataclasses.replace(result.calibration, presence_threshold=0.5) == base
  # Nothing to gain: the starting threshold is kept.
  best = result.calibration
  assert postprocess.search_presence(stats, best).calibration == best
