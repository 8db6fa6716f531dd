"""Which model answers: a run's name, checkpoint step, validation scores and calibration.

What the clinician's page, the evaluation report and TensorBoard say about a run, read
from its workdir only (config.json, checkpoints/, val_history.jsonl, eval/metrics.json,
calibration.json); nothing here loads weights.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

from nerveseg_jax import crossval, postprocess
from nerveseg_jax import workdir as workdir_lib

EVAL_METRICS = pathlib.Path("eval") / "metrics.json"


def checkpoint_step(workdir: str | pathlib.Path, which: str = "best") -> int:
  """The step of the checkpoint that `which` ('best' or 'latest') loads."""
  from nerveseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.select_step(workdir, which)


def _val_history_row(workdir: pathlib.Path, step: int) -> dict[str, Any] | None:
  """train's validation of `step` (val_history.jsonl), or None."""
  return next((r for r in workdir_lib.read_val_history(workdir) if int(r["step"]) == step), None)


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")


def model_info(workdir: str | pathlib.Path, which: str = "best") -> dict[str, Any]:
  """What the page's header and the report say about the run that answers.

  Scores: those of `evaluate` (at the frames' own size, after calibration) when
  eval/metrics.json was made from this same checkpoint step, else train's own
  validation of that step (at the network's resolution), else None. `scores_source`
  says which, so a number is never shown without where it came from.
  """
  workdir = pathlib.Path(workdir).expanduser()
  if crossval.is_cv_dir(workdir):
    return _cv_info(workdir)
  config = json.loads((workdir / "config.json").read_text())
  step = checkpoint_step(workdir, which)
  info: dict[str, Any] = dict(
      name=workdir.name, model=(config.get("model") or {}).get("name"),
      checkpoint=which, step=step, kaggle_score=None, nerve_dice=None, scores_source=None)
  eval_file = workdir / EVAL_METRICS
  evaluated = json.loads(eval_file.read_text()) if eval_file.exists() else {}
  if evaluated.get("checkpoint_step") == step and evaluated.get("metrics"):
    m = evaluated["metrics"]
    info.update(kaggle_score=m.get("kaggle_score"), nerve_dice=m.get("dice_nerve_frames"),
                scores_source="evaluate, validation split at the frames' own size")
  else:
    row = _val_history_row(workdir, step)
    if row is not None:
      info.update(kaggle_score=row.get("kaggle_score"), nerve_dice=row.get("nerve_dice"),
                  scores_source="training's validation at the network's resolution")
  cal_file = workdir / postprocess.CALIBRATION_FILE
  info["calibrated"] = cal_file.exists()
  info["calibrated_at"] = _utc(cal_file.stat().st_mtime) if cal_file.exists() else None
  return info


def _cv_info(cv_dir: pathlib.Path) -> dict[str, Any]:
  """model_info of a cross-validation folder: its out-of-fold scores, mean over folds."""
  cv = crossval.read(cv_dir)
  folds = crossval.fold_workdirs(cv_dir)
  config = json.loads((folds[0] / "config.json").read_text())
  mean = cv["mean"]["calibrated"]
  cal_file = cv_dir / postprocess.CALIBRATION_FILE
  return dict(
      name=cv_dir.name, model=(config.get("model") or {}).get("name"),
      checkpoint=cv.get("checkpoint"), step=None, folds=crossval.describe(cv_dir),
      kaggle_score=mean.get("kaggle_score"), nerve_dice=mean.get("dice_nerve_frames"),
      scores_source=("cross-validation: mean over folds, each scored on its own "
                     "validation subjects at the frames' own size, calibrated out of fold"),
      calibrated=cal_file.exists(),
      calibrated_at=_utc(cal_file.stat().st_mtime) if cal_file.exists() else None)
