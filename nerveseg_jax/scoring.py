"""Score and calibrate a trained run on labelled frames, as Kaggle scores them.

`run(workdir, ...)` is what `nerveseg-evaluate` and `sweep --evaluate` call:
predictions through the one inference.Predictor, resized back to each frame's source
size and scored with the project's Dice; on the validation split the post-processing
is first calibrated (postprocess.search) and saved to WORKDIR/calibration.json. It
writes WORKDIR/eval[/<split>]/metrics.json, per_frame.csv and report.html.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from nerveseg_jax import cli, crossval, inference, postprocess, report, runinfo, summaries
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.data import labelled
from nerveseg_jax.postprocess import Calibration

SPLITS = ("val", "train", "all", "test")
# Labelled frames read per device round trip (a few batches): bounds host memory.
_CHUNK = 64


def summarize(dice: np.ndarray, found: np.ndarray, has_nerve: np.ndarray) -> dict[str, Any]:
  """Kaggle score, Dice on nerve frames, presence precision / recall and confusion."""
  dice, found, has_nerve = (np.asarray(dice, np.float64), np.asarray(found, bool),
                            np.asarray(has_nerve, bool))
  tp = int(np.sum(found & has_nerve))
  fp = int(np.sum(found & ~has_nerve))
  fn = int(np.sum(~found & has_nerve))
  tn = int(np.sum(~found & ~has_nerve))
  # None (JSON null) where a ratio is undefined, e.g. recall without nerve frames.
  return dict(
      kaggle_score=float(dice.mean()) if dice.size else None,
      dice_nerve_frames=float(dice[has_nerve].mean()) if has_nerve.any() else None,
      presence_precision=tp / (tp + fp) if tp + fp else None,
      presence_recall=tp / (tp + fn) if tp + fn else None,
      confusion=dict(true_positive=tp, false_positive=fp, false_negative=fn,
                     true_negative=tn),
      num_frames=int(dice.size), num_nerve_frames=int(has_nerve.sum()))


def calibrate(predictor: inference.Predictor, frames: Iterable[labelled.Labelled], *,
              presence_only: bool = False, total: int | None = None
              ) -> tuple[postprocess.SearchResult, dict[str, Any]]:
  """Grid-searches the post-processing on labelled frames (one pass of inference).

  By default every setting is searched, starting from the uncalibrated defaults.
  With `presence_only` (the two-stage pipeline: the predictor's presence is its
  classifier's), the predictor's current mask settings are kept and only the presence
  threshold is searched, starting from the predictor's current one.
  Returns the search result and the full metrics of the starting calibration.
  TOTAL, the number of frames where known, gives the progress lines an ETA.
  """
  start = predictor.calibration if presence_only else Calibration()
  stats = (postprocess.FrameStats((start.mask_threshold,)) if presence_only
           else postprocess.FrameStats())
  for chunk in cli.progress(labelled.chunks(frames, _CHUNK), total, "calibrated", size=len):
    for i, prob, presence in predictor.probabilities([f.image for f in chunk]):
      stats.add(prob, presence, chunk[i].truth)
  result = (postprocess.search_presence(stats, start) if presence_only
            else postprocess.search(stats))
  a = stats.arrays()
  before = summarize(stats.per_frame_dice(start), stats.decisions(start),
                     a["truth_area"] > 0)
  return result, before


def score(predictor: inference.Predictor, frames: Iterable[labelled.Labelled],
          builder: report.ReportBuilder | None = None, *, total: int | None = None
          ) -> tuple[dict[str, Any], list[dict]]:
  """Scores the predictor's calibrated output with the project's Dice; per-frame rows."""
  from nerveseg_jax import metrics  # pylint: disable=g-import-not-at-top
  rows = []
  for chunk in cli.progress(labelled.chunks(frames, _CHUNK), total, "scored", size=len):
    for result, frame in zip(predictor.predict([f.image for f in chunk],
                                               [f.name for f in chunk]), chunk):
      dice = float(np.asarray(metrics.dice_per_example(
          result.mask[None] != 0, frame.truth[None] != 0))[0])
      rows.append(dict(name=frame.name, dice=dice, presence=result.presence,
                       found=result.decision, has_nerve=bool(frame.truth.any()),
                       area=result.area, truth_area=int(frame.truth.sum())))
      if builder is not None:
        builder.add(frame.name, frame.image, result.mask, result.presence, result.decision,
                    truth=frame.truth, dice=dice)
  if not rows:
    raise ValueError("no frames to evaluate")
  m = summarize([r["dice"] for r in rows], [r["found"] for r in rows],
                [r["has_nerve"] for r in rows])
  return m, rows


def calibrate_segmentation(predictor: inference.Predictor, frames: Iterable[labelled.Labelled],
                            workdir: pathlib.Path, *, tta: bool, which: str,
                            total: int | None = None
                            ) -> tuple[postprocess.SearchResult, dict[str, Any]]:
  """Calibrates a segmentation run alone and saves WORKDIR/calibration.json."""
  result, before = calibrate(predictor, frames, total=total)
  postprocess.save_calibration(workdir, result.calibration, dict(
      before=result.default_score, after=result.score, frames=result.num_frames,
      grid_size=result.grid_size, tta=tta, checkpoint=which))
  return result, before


def run(workdir: str | pathlib.Path, *, config=None, split: str = "val",
        folder: str | None = None, tta: bool = False, batch_size: int | None = None,
        which: str = "best", calibrate_split: bool = True,
        classifier_workdir: str | pathlib.Path | None = None) -> dict[str, Any]:
  """Evaluates (and on the validation split calibrates) a run; writes metrics.json.

  With `classifier_workdir`, the two-stage pipeline is evaluated: the classifier
  decides presence and the segmentation run draws the mask, with the settings
  inference.Predictor gives that pair (the run's mask settings, the classifier's
  presence threshold). Calibration on the validation split then chooses the
  classifier's presence threshold and saves it to CLASSIFIER_WORKDIR/calibration.json,
  where Predictor reads it; the run's own calibration.json is left as it is (a run
  never calibrated is first calibrated alone, as without a classifier).
  """
  workdir = pathlib.Path(workdir).expanduser()
  if split not in SPLITS:
    raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
  cv = crossval.is_cv_dir(workdir)
  if cv and split == "val" and not folder:
    if classifier_workdir or not calibrate_split:
      raise ValueError(f"--workdir {workdir} is a cross-validation folder: its validation "
                       "score is out of fold, always calibrated on the folds' own "
                       "predictions, without a classifier; drop --classifier_workdir and "
                       "--no_calibrate, or score a --folder or --split test")
    return out_of_fold(workdir, tta=tta, batch_size=batch_size)
  if config is None:
    config = workdir_lib.read_config(crossval.fold_workdirs(workdir)[0] if cv else workdir)
  batch_size = batch_size or int(config.get("eval_batch_size", 8))
  classifier_dir = (pathlib.Path(classifier_workdir).expanduser() if classifier_workdir
                    else None)
  saved = postprocess.load_calibration(workdir)
  skipped: list[dict[str, str]] = []
  total: int | None = None  # frames to score, where known up front: the progress ETA
  if folder:
    source, frames = f"folder {folder}", lambda: labelled.folder_frames(folder, skipped)
  else:
    ids = None if split == "test" else labelled.split_ids(config.data, split)
    total = None if ids is None else len(ids)
    source, frames = f"split {split}", lambda: labelled.dataset_frames(config.data, split, ids)
  out_dir = workdir / "eval" if (split == "val" and not folder) else (
      workdir / "eval" / ("folder_" + pathlib.Path(folder).name if folder else split))
  out: dict[str, Any] = dict(workdir=str(workdir), source=source, checkpoint=which, tta=tta,
                            checkpoint_step=None if cv else runinfo.checkpoint_step(
                                workdir, which))
  calibrating = split == "val" and not folder and calibrate_split

  if classifier_dir is None:
    out["classifier_workdir"] = None
    out["pipeline"] = "segmentation only: the run's presence head decides presence"
    predictor = inference.Predictor([workdir], tta=tta, batch_size=batch_size, which=which,
                                    calibration=Calibration())
    if calibrating:
      inference.log(f"calibrating on {source} ...")
      result, before = calibrate_segmentation(predictor, frames(), workdir, tta=tta,
                                               which=which, total=total)
      predictor.calibration = result.calibration
      out["calibration_search"] = dict(grid_size=result.grid_size, frames=result.num_frames,
                                       saved=str(workdir / postprocess.CALIBRATION_FILE))
      out["before_calibration"] = before
    else:
      predictor.calibration = saved or Calibration()
      out["calibration_source"] = (str(workdir / postprocess.CALIBRATION_FILE) if saved
                                   else "defaults (run not calibrated)")
  else:
    out["classifier_workdir"] = str(classifier_dir)
    out["pipeline"] = (f"two-stage: the classifier {classifier_dir} decides presence, "
                       f"the segmentation run {workdir} draws the mask")
    if calibrating and saved is None:
      # The mask settings are the run's own; a run never calibrated gets them first.
      inference.log(f"{workdir} was never calibrated: calibrating it alone on {source} ...")
      alone = inference.Predictor([workdir], tta=tta, batch_size=batch_size, which=which,
                                  calibration=Calibration())
      result, _ = calibrate_segmentation(alone, frames(), workdir, tta=tta, which=which,
                                         total=total)
      del alone
      saved = result.calibration
      out["segmentation_calibration_search"] = dict(
          grid_size=result.grid_size, frames=result.num_frames,
          saved=str(workdir / postprocess.CALIBRATION_FILE))
    # calibration=None: exactly the settings predict and serve use for this pair.
    predictor = inference.Predictor([workdir], classifier_dir, tta=tta,
                                    batch_size=batch_size, which=which, calibration=None)
    cls_file = classifier_dir / postprocess.CALIBRATION_FILE
    if calibrating:
      inference.log(f"calibrating the classifier's presence threshold on {source} ...")
      result, before = calibrate(predictor, frames(), presence_only=True, total=total)
      predictor.calibration = result.calibration
      # Predictor reads only presence_threshold from the classifier's file; the mask
      # settings it was calibrated with are kept there as a record.
      postprocess.save_calibration(classifier_dir, result.calibration, dict(
          before=result.default_score, after=result.score, frames=result.num_frames,
          grid_size=result.grid_size, tta=tta, checkpoint=which,
          segmentation_workdir=str(workdir),
          note=("only presence_threshold is used (by inference.Predictor with this "
                "classifier); the mask settings are the segmentation run's")))
      out["calibration_search"] = dict(
          grid_size=result.grid_size, frames=result.num_frames, saved=str(cls_file),
          searched="the classifier's presence_threshold (mask settings: "
                   f"{workdir / postprocess.CALIBRATION_FILE})")
      out["before_calibration"] = before
    else:
      out["calibration_source"] = (
          "mask settings: " + (str(workdir / postprocess.CALIBRATION_FILE) if saved
                               else "defaults (run not calibrated)")
          + "; presence threshold: " + (str(cls_file) if cls_file.exists()
                                        else "the default (classifier not calibrated)"))
  out["calibration"] = predictor.calibration.to_dict()
  builder = report.ReportBuilder(f"Evaluation of {workdir.name} on {source}"
                                 + (f" with classifier {classifier_dir.name}"
                                    if classifier_dir else ""))
  inference.log(f"scoring {source} ...")
  metrics, rows = score(predictor, frames(), builder, total=total)
  out["metrics"] = metrics
  # Frames that could not be read: named here, and main() exits 1, so a score over
  # fewer frames than the folder holds is never mistaken for the whole folder's.
  out["skipped"] = skipped
  out_dir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_text_atomic(out_dir / "metrics.json", json.dumps(out, indent=2) + "\n")
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  workdir_lib.write_text_atomic(out_dir / "per_frame.csv", table.getvalue())
  builder.write(out_dir / "report.html", **report.evaluation_sections(out))
  if not cv:  # a CV folder has no steps of its own to plot against
    summaries.write_evaluation(workdir, out)  # the run's TensorBoard, beside training's
  out["output_dir"] = str(out_dir)
  return out


def out_of_fold(cv_dir: str | pathlib.Path, *, tta: bool = False,
                batch_size: int | None = None) -> dict[str, Any]:
  """A cross-validation folder's folds scored again on their own validation subjects
  (crossval.score_folds: rewrites cv.json, cv.md and the out-of-fold calibration.json);
  returns run()'s dict, with the out-of-fold metrics before and after calibration."""
  cv_dir = pathlib.Path(cv_dir).expanduser()
  cv = crossval.read(cv_dir)
  folds = [dict(r, workdir=cv_dir / r["workdir"]) for r in cv["per_fold"]]
  cv = crossval.score_folds(cv_dir, folds, num_folds=int(cv["num_folds"]), tta=tta,
                            batch_size=batch_size)
  out = dict(workdir=str(cv_dir), source=f"out of fold, {crossval.describe(cv_dir)}",
             checkpoint=crossval.CHECKPOINT, checkpoint_step=None, tta=tta,
             classifier_workdir=None,
             pipeline="each fold on its own validation subjects (not an ensemble)",
             before_calibration=cv["out_of_fold"]["default"],
             metrics=cv["out_of_fold"]["calibrated"], calibration=cv["calibration"],
             calibration_search=dict(saved=str(cv_dir / postprocess.CALIBRATION_FILE)),
             cross_validation={k: cv[k] for k in ("mean", "sd", "folds", "num_folds")},
             skipped=[], output_dir=str(cv_dir / "eval"))
  workdir_lib.write_text_atomic(cv_dir / "eval" / "metrics.json",
                                json.dumps(out, indent=2) + "\n")
  return out
