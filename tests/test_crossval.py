"""nerveseg_jax.crossval and `sweep --folds`: every fold trained, scored out of fold,
one calibration, resume, and the CV folder as --workdir of predict, evaluate and serve."""

import json

import numpy as np
import pytest

from nerveseg_jax import crossval, evaluate, inference, postprocess, predict, runinfo
from nerveseg_jax import sweep, trainer, webapp
from nerveseg_jax.data import labelled
from test_train import smoke_config, smoke_data_dir
from test_ux_page import _healthz

SHORT = {"num_train_steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 4,
         "log_every_steps": 2, "warmup_steps": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return smoke_data_dir(tmp_path_factory)


def _config(data_dir):
  return smoke_config(data_dir, **SHORT)


@pytest.fixture(scope="module")
def cv_dir(data_dir, tmp_path_factory):
  """The smoke config cross-validated over 2 folds (what `sweep --folds 2` runs)."""
  out = tmp_path_factory.mktemp("cv")
  cvs, table = sweep.run_cv_sweep(_config(data_dir), None, out, 2, [0, 1], "cv")
  assert list(cvs) == [out.name] and "mean ± sd" in table
  return out


def test_every_fold_trained_scored_out_of_fold_and_summarised(cv_dir, data_dir):
  cv = json.loads((cv_dir / crossval.CV_FILE).read_text())
  assert cv["num_folds"] == 2 and cv["folds"] == [0, 1] and cv["complete"]
  assert cv["checkpoint"] == "latest"
  seen = set()
  for k, row in enumerate(cv["per_fold"]):
    assert row["fold"] == k and row["status"] == "ok" and row["workdir"] == f"fold_{k}"
    cfg = json.loads((cv_dir / f"fold_{k}" / "config.json").read_text())
    assert (cfg["data"]["num_folds"], cfg["data"]["fold"]) == (2, k)
    # Scored on exactly this fold's validation subjects.
    ids = labelled.split_ids(smoke_config(data_dir, **{"data.num_folds": 2,
                                                       "data.fold": k}).data, "val")
    assert row["frames"] == len(ids) and not seen & ids
    seen |= ids
    for label in ("default", "calibrated"):
      assert 0.0 <= row[label]["kaggle_score"] <= 1.0
    assert row["wall_seconds"] > 0 and row["step"] == 4
  # Every labelled frame is out of fold exactly once.
  all_ids = labelled.split_ids(smoke_config(data_dir, **{"data.num_folds": 2}).data, "all")
  assert seen == all_ids
  # mean ± sd are over the folds (sample sd), for both metrics and both calibrations.
  for label in ("default", "calibrated"):
    for k in crossval.METRICS:
      vals = [r[label][k] for r in cv["per_fold"]]
      if all(v is not None for v in vals):
        assert cv["mean"][label][k] == pytest.approx(np.mean(vals))
        assert cv["sd"][label][k] == pytest.approx(np.std(vals, ddof=1))
  # One calibration, chosen on all folds' out-of-fold frames together, saved for the
  # ensemble; the per-frame table has every frame.
  cal = postprocess.load_calibration(cv_dir)
  assert cal.to_dict() == cv["calibration"]
  saved = json.loads((cv_dir / postprocess.CALIBRATION_FILE).read_text())
  assert saved["scores"]["frames"] == len(all_ids) == cv["out_of_fold"]["calibrated"][
      "num_frames"]
  rows = (cv_dir / "eval" / "per_frame.csv").read_text().splitlines()
  assert len(rows) == 1 + len(all_ids)
  assert cv["out_of_fold"]["calibrated"]["kaggle_score"] >= (
      cv["out_of_fold"]["default"]["kaggle_score"] - 1e-12)
  table = (cv_dir / crossval.CV_TABLE).read_text()
  assert "| 0 |" in table and "| 1 |" in table and "**mean ± sd**" in table


def test_rerun_resumes_without_training_or_rescoring(cv_dir, data_dir, monkeypatch):
  before = (cv_dir / crossval.CV_FILE).read_text()
  monkeypatch.setattr(trainer, "train_and_evaluate",
                      lambda *a, **k: pytest.fail("a finished fold was trained again"))
  monkeypatch.setattr(crossval, "score_folds",
                      lambda *a, **k: pytest.fail("an unchanged CV was scored again"))
  sweep.run_cv_sweep(_config(data_dir), None, cv_dir, 2, [0, 1], "cv")
  assert (cv_dir / crossval.CV_FILE).read_text() == before
  # A changed config for an existing fold is an error naming the key, not a mixed CV.
  changed = _config(data_dir)
  changed.learning_rate = 0.5
  with pytest.raises(sweep.SweepError, match=r"fold 0.*another config.*learning_rate"):
    sweep.run_cv_sweep(changed, None, cv_dir, 2, [0, 1], "cv")


def test_predictor_ensembles_the_folds_with_the_out_of_fold_calibration(cv_dir):
  p = inference.Predictor([cv_dir], batch_size=2)
  assert p.workdirs == [cv_dir / "fold_0", cv_dir / "fold_1"]
  assert p.calibration == postprocess.load_calibration(cv_dir)
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 255, (70, 90), np.uint8), rng.integers(0, 255, (64, 96), np.uint8)]
  ensemble = [prob for _, prob, _ in p.probabilities(frames)]
  singles = [[prob for _, prob, _ in inference.Predictor(
      [w], batch_size=2, which="latest").probabilities(frames)] for w in p.workdirs]
  for i, prob in enumerate(ensemble):
    np.testing.assert_allclose(prob, (singles[0][i] + singles[1][i]) / 2, atol=1e-5)
  assert inference.check_run(cv_dir) == cv_dir


def test_faces_take_the_cv_folder(cv_dir, tmp_path, capsys):
  # evaluate on the validation split: the folds out of fold, as cv.json has them.
  assert evaluate.main(["--workdir", str(cv_dir)]) == 0
  out = capsys.readouterr().out
  assert "out of fold, 2 of 2 folds" in out and "cv.md" in out
  cv = crossval.read(cv_dir)
  m = json.loads((cv_dir / "eval" / "metrics.json").read_text())
  assert m["metrics"] == cv["out_of_fold"]["calibrated"]
  with pytest.raises(ValueError, match="cross-validation folder"):
    evaluate.run(cv_dir, calibrate_split=False)
  # predict: the ensemble writes a submission.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  for i in range(3):
    Image.fromarray(np.full((60, 80), 40 * i, np.uint8)).save(images / f"{i + 1}.png")
  assert predict.main(["--workdir", str(cv_dir), "--images", str(images),
                       "--output", str(tmp_path / "out")]) == 0
  lines = (tmp_path / "out" / "submission.csv").read_text().splitlines()
  assert lines[0] == "img,pixels" and len(lines) == 4
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert "fold_0" in summary["pipeline"] and "fold_1" in summary["pipeline"]
  # serve's page: the CV folder is named with its folds and out-of-fold scores.
  info = runinfo.model_info(cv_dir)
  assert info["folds"] == "2 of 2 folds" and info["step"] is None
  assert info["kaggle_score"] == cv["mean"]["calibrated"]["kaggle_score"]
  body = _healthz(webapp.create_app(inference.Predictor([cv_dir], batch_size=1),
                                    warmup=False))
  assert body["workdirs"] == [f"{cv_dir.name}/fold_0", f"{cv_dir.name}/fold_1"]
  assert body["model"]["name"] == cv_dir.name and body["model"]["folds"] == "2 of 2 folds"
  assert body["calibration"] == cv["calibration"]


def test_partial_cv_and_sweep_of_cvs_with_paired_differences(data_dir, tmp_path):
  spec = {"base": {}, "noise_run": "seed1",
          "runs": [{"name": "base"}, {"name": "seed1", "seed": 1}]}
  cvs, table = sweep.run_cv_sweep(_config(data_dir), spec, tmp_path, 4, [0, 2], "study")
  assert set(cvs) == {"base", "seed1"}
  for cv in cvs.values():
    assert cv["folds"] == [0, 2] and not cv["complete"] and cv["num_folds"] == 4
  d = crossval.paired_difference(cvs["base"], cvs["seed1"], "default", "dice_nerve_frames")
  assert d["n"] in (0, 1, 2)
  assert "| base | (base) | 2 |" in table and "| seed1 | `seed=1` | 2 |" in table
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert saved["base_run"] == "base" and set(saved["runs"]) == {"base", "seed1"}
  assert crossval.describe(tmp_path / "base") == "2 of 4 folds"
  assert len(inference.Predictor([tmp_path / "base"], batch_size=2).runs) == 2


def test_paired_difference_and_noise_floor():
  def cv(values):
    return {"per_fold": [{"fold": k, "status": "ok", "default": {"m": v}}
                         for k, v in enumerate(values)]}
  d = crossval.paired_difference(cv([0.6, 0.7, 0.8]), cv([0.65, 0.74, 0.86]), "default", "m")
  assert d["n"] == 3 and d["mean"] == pytest.approx(0.05)
  assert d["sd"] == pytest.approx(np.std([0.05, 0.04, 0.06], ddof=1))
  assert crossval.noise_floor(d, None) == pytest.approx(2 * d["sd"] / np.sqrt(3))
  assert crossval.noise_floor(d, 0.2) == 0.2


def test_bad_folds_are_one_line_errors(capsys):
  with pytest.raises(crossval.CrossValError, match="--folds must be >= 2"):
    crossval.parse_folds(1)
  with pytest.raises(crossval.CrossValError, match=r"--fold_ids '0,5'.*0\.\.4"):
    crossval.parse_folds(5, "0,5")
  assert crossval.parse_folds(5, "1,0") == [0, 1]
  assert sweep.main(["--config", "unet:smoke", "--fold_ids", "0"]) != 0
  assert "--fold_ids needs --folds" in capsys.readouterr().err
  assert sweep.main(["--config", "unet:smoke"]) != 0
  assert "--folds K" in capsys.readouterr().err


def test_inference_levers_out_of_fold(cv_dir, capsys):
  # The same folds as their own partner: the ensemble of a run with itself is the run.
  levers = crossval.inference_levers(cv_dir, partner=cv_dir, batch_size=2)
  rows = {r["setting"]: r for r in levers["rows"]}
  assert list(rows) == ["uncalibrated", "calibrated, no largest component", "calibrated",
                        "calibrated + flip TTA", "calibrated + 2-run ensemble",
                        "calibrated + 2-run ensemble + flip TTA"]
  assert rows["uncalibrated"]["calibration"] == postprocess.Calibration().to_dict()
  assert not rows["calibrated, no largest component"]["calibration"]["largest_component"]
  cv = crossval.read(cv_dir)
  assert rows["uncalibrated"]["kaggle_score"] == pytest.approx(
      cv["out_of_fold"]["default"]["kaggle_score"])
  assert rows["calibrated"]["kaggle_score"] == pytest.approx(
      cv["out_of_fold"]["calibrated"]["kaggle_score"])
  assert rows["calibrated + 2-run ensemble"]["kaggle_score"] == pytest.approx(
      rows["calibrated"]["kaggle_score"], abs=1e-6)
  assert evaluate.main(["--workdir", str(cv_dir), "--levers", "--batch_size", "2"]) == 0
  assert "calibrated + flip TTA" in capsys.readouterr().out
  assert (cv_dir / "eval" / "levers.md").exists()
  assert evaluate.main(["--workdir", str(cv_dir / "fold_0"), "--levers"]) != 0
  assert "not a cross-validation folder" in capsys.readouterr().err


def test_preempted_fold_stops_the_cv_with_143_and_nothing_scored(tmp_path, monkeypatch,
                                                                  capsys):
  monkeypatch.setattr(trainer, "train_and_evaluate", lambda *a, **k: {"preempted": True})
  monkeypatch.setattr(crossval, "score_folds",
                      lambda *a, **k: pytest.fail("a preempted CV was scored"))
  code = sweep.main(["--config", "unet:smoke", "--folds", "2",
                     "--workdir", str(tmp_path / "cv")])
  assert code == 143
  assert "run the same command again to resume" in capsys.readouterr().out
  assert not (tmp_path / "cv" / crossval.CV_FILE).exists()


def test_compare_pairs_cv_folders_made_apart_and_names_what_differs(cv_dir, tmp_path,
                                                                       capsys):
  import shutil
  other = tmp_path / "cv_seed1"
  shutil.copytree(cv_dir, other)
  # The same folds, another seed, and known scores: +0.02 and +0.04 on the two folds.
  for k in (0, 1):
    cfg_path = other / f"fold_{k}" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["seed"] = 1
    cfg_path.write_text(json.dumps(cfg))
  base_cv = json.loads((cv_dir / crossval.CV_FILE).read_text())
  cv = json.loads((other / crossval.CV_FILE).read_text())
  for row, add in zip(cv["per_fold"], (0.02, 0.04)):
    row["calibrated"]["dice_nerve_frames"] += add
  (other / crossval.CV_FILE).write_text(json.dumps(cv))

  cvs, table = crossval.compare([cv_dir, other])
  assert list(cvs) == [cv_dir.name, "cv_seed1"]
  d = crossval.paired_difference(base_cv, cvs["cv_seed1"], "calibrated", "dice_nerve_frames")
  assert d["n"] == 2 and d["mean"] == pytest.approx(0.03) and d["sd"] == pytest.approx(
      np.std([0.02, 0.04], ddof=1))
  row = next(line for line in table.splitlines() if line.startswith("| cv_seed1 |"))
  assert "`seed=1`" in row and "`data.fold" not in row and "+0.030 ± 0.014" in row
  assert f"| {cv_dir.name} | (base) | 2 |" in table

  # The face prints the same table and trains nothing.
  assert sweep.main(["--compare", str(cv_dir), str(other)]) == 0
  assert capsys.readouterr().out.strip() == table.strip()

  with pytest.raises(crossval.CrossValError, match="at least two CV folders"):
    crossval.compare([cv_dir])
  with pytest.raises(crossval.CrossValError, match=f"{tmp_path}: not a CV folder"):
    crossval.compare([cv_dir, tmp_path])
  cv["num_folds"] = 3
  (other / crossval.CV_FILE).write_text(json.dumps(cv))
  with pytest.raises(crossval.CrossValError, match="cv_seed1: a 3-fold split"):
    crossval.compare([cv_dir, other])
  assert sweep.main(["--compare", str(cv_dir), str(other), "--folds", "2"]) == 2
  assert "takes no --sweep, --folds or --config" in capsys.readouterr().err
