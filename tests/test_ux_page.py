"""What the page says about the model that answers: runinfo.model_info, /healthz's
`model` and `uncertain_margin`, the serve flag, and the favicon. (The page itself, in
a browser, is in test_serve_browser.py.)"""

import dataclasses
import json
import os
import pathlib
import re
import time

import pytest
from fastapi.testclient import TestClient

from nerveseg_jax import postprocess, runinfo, serve, webapp
from nerveseg_jax import workdir as workdir_lib


def _workdir(tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "unet_kaggle"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"model": {"name": "unet"}}))
  for step, score, dice in ((100, 0.61, 0.40), (200, 0.70, 0.52), (300, 0.68, 0.55)):
    workdir_lib.append_val_history(workdir, step, {"kaggle_score": score, "nerve_dice": dice})
  return workdir


def test_model_info_takes_scores_of_the_loaded_step(tmp_path, monkeypatch):
  workdir = _workdir(tmp_path)
  monkeypatch.setattr(runinfo, "checkpoint_step", lambda w, which="best": 200)
  info = runinfo.model_info(workdir)
  assert (info["name"], info["model"], info["step"]) == ("unet_kaggle", "unet", 200)
  assert (info["kaggle_score"], info["nerve_dice"]) == (0.70, 0.52)   # step 200, not 300
  assert "training" in info["scores_source"]
  assert info["calibrated"] is False and info["calibrated_at"] is None

  # evaluate's scores win, but only when made from this same checkpoint step.
  (workdir / "eval").mkdir()
  metrics = {"kaggle_score": 0.74, "dice_nerve_frames": 0.58}
  (workdir / "eval" / "metrics.json").write_text(json.dumps(
      {"checkpoint_step": 300, "metrics": metrics}))
  assert runinfo.model_info(workdir)["kaggle_score"] == 0.70            # stale: ignored
  (workdir / "eval" / "metrics.json").write_text(json.dumps(
      {"checkpoint_step": 200, "metrics": metrics}))
  info = runinfo.model_info(workdir)
  assert (info["kaggle_score"], info["nerve_dice"]) == (0.74, 0.58)
  assert "evaluate" in info["scores_source"]

  path = postprocess.save_calibration(workdir, postprocess.Calibration(presence_threshold=0.3))
  os.utime(path, (1796428800, 1796428800))
  info = runinfo.model_info(workdir)
  assert info["calibrated"] is True and info["calibrated_at"] == "2026-12-05 00:00 UTC"


def test_model_info_of_a_trained_and_calibrated_run(calibrated_run):
  info = runinfo.model_info(calibrated_run)
  metrics = json.loads((calibrated_run / "eval" / "metrics.json").read_text())
  assert info["step"] == metrics["checkpoint_step"] > 0
  assert info["kaggle_score"] == metrics["metrics"]["kaggle_score"]
  assert info["calibrated"] and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC",
                                             info["calibrated_at"])


@dataclasses.dataclass
class _FakePredictor:
  """What /healthz reads of a Predictor; no weights, no inference."""
  workdirs: list
  classifier_workdir: None = None
  tta: bool = False
  batch_size: int = 1
  calibration: postprocess.Calibration = postprocess.Calibration()
  cv_dirs: list = dataclasses.field(default_factory=list)


def _healthz(app) -> dict:
  with TestClient(app, base_url="http://localhost") as client:
    deadline = time.monotonic() + 30
    while (r := client.get("/healthz")).status_code != 200:
      assert time.monotonic() < deadline, r.text
      time.sleep(0.05)
    return r.json()


def test_healthz_names_the_model_and_the_uncertain_margin(tmp_path, monkeypatch):
  workdir = _workdir(tmp_path)
  monkeypatch.setattr(runinfo, "checkpoint_step", lambda w, which="best": 300 if
                      which == "latest" else 200)
  app = webapp.create_app(_FakePredictor([workdir]), warmup=False, uncertain_margin=0.15,
                          which="latest")
  body = _healthz(app)
  assert body["uncertain_margin"] == 0.15
  assert body["model"]["name"] == "unet_kaggle" and body["model"]["step"] == 300
  assert body["model"]["kaggle_score"] == 0.68


def test_healthz_still_answers_when_the_run_cannot_be_described(tmp_path):
  workdir = tmp_path / "gone"  # no config.json, no checkpoints
  body = _healthz(webapp.create_app(_FakePredictor([workdir]), warmup=False))
  assert body["status"] == "ready" and body["uncertain_margin"] == 0.1
  assert body["model"]["name"] == "gone" and "config.json" in body["model"]["error"]


def test_uncertain_margin_is_checked():
  with pytest.raises(ValueError, match="--uncertain_margin must be in"):
    webapp.create_app(_FakePredictor([pathlib.Path("x")]), uncertain_margin=0.7)
  with pytest.raises(SystemExit):
    serve.parse_args(["--workdir", "x", "--uncertain_margin", "-0.1"])
  assert serve.parse_args(["--workdir", "x", "--uncertain_margin", "0.2"]).uncertain_margin == 0.2


def test_favicon_is_served_and_linked(tmp_path):
  app = webapp.create_app(_FakePredictor([tmp_path]), warmup=False)
  with TestClient(app, base_url="http://localhost") as client:
    page = client.get("/").text
    href = re.search(r'<link rel="icon"[^>]*href="([^"]+)"', page).group(1)
    r = client.get(href)
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert r.text.lstrip().startswith("<svg")
