"""Evaluate a trained run at source resolution, as Kaggle scores it, and calibrate it.

  python -m nerveseg_jax.evaluate --workdir DIR [--config CONFIG] \
      [--split val|train|all|test] [--folder PATH] [--tta] [--no_calibrate] \
      [--classifier_workdir CLS]

Default: the validation fold of the run's own config (WORKDIR/config.json; --config
overrides it). Predictions are resized back to each frame's source size and scored
against the original masks. On the validation split the post-processing is first
calibrated (postprocess.search) and saved to WORKDIR/calibration.json; other splits
use the saved calibration. Writes WORKDIR/eval/metrics.json (or
WORKDIR/eval/<split>/metrics.json for other splits) and report.html next to it, and
prints a table with the metrics before and after calibration.

--classifier_workdir CLS evaluates the two-stage pipeline through the same
inference.Predictor that predict and serve use: the classifier decides presence, the
U-Net draws the mask with its own calibrated mask settings (a U-Net never calibrated
is first calibrated alone). On the validation split the classifier's presence
threshold is then calibrated (current threshold kept on ties, so the score never
drops) and saved to CLS/calibration.json, where Predictor reads it; WORKDIR's own
calibration.json is not changed. metrics.json names the classifier ("pipeline",
"classifier_workdir").

--folder PATH scores a labelled folder instead: PATH/images/NAME.ext with
PATH/masks/NAME_mask.ext, or Kaggle's flat NAME.tif with NAME_mask.tif. A frame or
mask that cannot be read is named, skipped and listed in metrics.json ("skipped");
the rest are scored and the exit status is 1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import pathlib
import sys
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from nerveseg_jax import cli, imageio, inference, postprocess, report, rle, runinfo, summaries
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.postprocess import Calibration
from nerveseg_jax import xla_flags

SPLITS = ("val", "train", "all", "test")
# Labelled frames read per device round trip (a few batches): bounds host memory.
_CHUNK = 64


@dataclasses.dataclass
class Labelled:
  name: str
  image: np.ndarray   # uint8 (H, W)
  truth: np.ndarray   # uint8 (H, W) 0/1


# ---------------------------------------------------------------------------- sources

def split_ids(data_cfg, split: str) -> set[str]:
  """Frame ids of a pipeline split: folds and filtering exactly as in training."""
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return {_text(i) for i in pipeline.load_arrays(data_cfg, split).id}


def _dataset_frames(data_cfg, split: str, ids: set[str] | None = None
                    ) -> Iterator[Labelled]:
  """Source-resolution frames and masks of a pipeline split, from the TFDS builder.

  Split membership comes from pipeline.load_arrays (its arrays are resized, so only
  the ids are used); pixels come from the builder, which stores the source size.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  if split == "test":
    yield from _test_frames(data_cfg)
    return
  ids = split_ids(data_cfg, split) if ids is None else ids
  builder = tfds_source.build(data_cfg)
  for ex in tfds.as_numpy(builder.as_dataset(split="train")):
    name = _text(ex["id"])
    if name in ids:
      yield Labelled(name, ex["image"][..., 0], (ex["mask"][..., 0] != 0).astype(np.uint8))


def _test_frames(data_cfg) -> Iterator[Labelled]:
  """Kaggle test frames scored against test_truth.csv (only the synthetic set has one)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  builder = tfds_source.build(data_cfg)  # first: it generates a synthetic tree
  truth_csv = _find_test_truth(data_cfg)
  truths: dict[str, str] = {}
  with open(truth_csv, newline="") as f:
    for row in csv.DictReader(f):
      truths[row["img"]] = row["pixels"]
  for ex in tfds.as_numpy(builder.as_dataset(split="test")):
    name = _text(ex["id"])
    if name not in truths:
      raise ValueError(f"{truth_csv}: no row for test frame {name!r}")
    h, w = ex["image"].shape[:2]
    yield Labelled(name, ex["image"][..., 0], rle.decode(truths[name], h, w))


def _find_test_truth(data_cfg) -> pathlib.Path:
  """test_truth.csv of the raw tree the builder was made from (synthetic sets have one)."""
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  if data_cfg.manual_dir:
    raw = pathlib.Path(data_cfg.manual_dir).expanduser()
  elif data_cfg.source == "synthetic":
    # Where tfds_source.build generates the tree when data.manual_dir is empty.
    key = (f"s{data_cfg.synthetic_subjects}_f{data_cfg.synthetic_frames}"
           f"_seed{data_cfg.synthetic_seed}")
    raw = tfds_source._data_dir(data_cfg) / "synthetic_raw" / key  # pylint: disable=protected-access
  else:
    raw = None
  if raw is None or not (raw / "test_truth.csv").exists():
    raise ValueError("--split test: the Kaggle test split is unlabelled; only a tree with "
                     "test_truth.csv (the synthetic set) can be scored; none in "
                     f"{raw if raw is not None else 'data.manual_dir (empty)'}")
  return raw / "test_truth.csv"


def _folder_frames(folder: str | pathlib.Path,
                   skipped: list[dict[str, str]] | None = None) -> Iterator[Labelled]:
  """Frames and masks of a labelled folder (images/ + masks/, or flat Kaggle layout).

  A frame or mask that cannot be read is reported by name, appended to `skipped`
  (when given) and left out; the other frames are still scored. Without `skipped`
  the first such file raises.
  """
  folder = pathlib.Path(folder).expanduser()
  if (folder / "images").is_dir():
    image_dir, mask_dir = folder / "images", folder / "masks"
  else:
    image_dir = mask_dir = folder
  if not image_dir.is_dir():
    raise FileNotFoundError(f"--folder {folder}: not a folder")
  paths, _ = imageio.list_inputs(image_dir)
  if not paths:
    raise ValueError(f"--folder {folder}: no tif/png/jpg frames found")
  masks = {}
  if mask_dir.is_dir():
    masks = {p.stem[:-len("_mask")]: p for p in mask_dir.iterdir()
             if imageio.is_image_file(p) and imageio.is_mask_name(p)}
  missing = [p.name for p in paths if p.stem not in masks]
  if missing:
    raise ValueError(f"--folder {folder}: {len(missing)} frames have no NAME_mask file in "
                     f"{mask_dir}, e.g. {missing[:3]}")
  for p in paths:
    try:
      image, truth = imageio.read_gray(p), imageio.read_mask(masks[p.stem])
      if image.shape != truth.shape:
        raise imageio.ImageReadError(
            f"{masks[p.stem]}: mask is {truth.shape[1]}x{truth.shape[0]}, frame {p} is "
            f"{image.shape[1]}x{image.shape[0]}")
    except imageio.ImageReadError as e:
      if skipped is None:
        raise
      skipped.append(dict(file=str(p), error=str(e)))
      inference.log(f"skipped {e}")
      continue
    yield Labelled(p.stem, image, truth)


def _text(x: Any) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def _chunks(frames: Iterable[Labelled], size: int) -> Iterator[list[Labelled]]:
  chunk: list[Labelled] = []
  for f in frames:
    chunk.append(f)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


# ---------------------------------------------------------------------------- scoring

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


def calibrate(predictor: inference.Predictor, frames: Iterable[Labelled], *,
              presence_only: bool = False
              ) -> tuple[postprocess.SearchResult, dict[str, Any]]:
  """Grid-searches the post-processing on labelled frames (one pass of inference).

  By default every setting is searched, starting from the uncalibrated defaults.
  With `presence_only` (the two-stage pipeline: the predictor's presence is its
  classifier's), the predictor's current mask settings are kept and only the presence
  threshold is searched, starting from the predictor's current one.
  Returns the search result and the full metrics of the starting calibration.
  """
  start = predictor.calibration if presence_only else Calibration()
  stats = (postprocess.FrameStats((start.mask_threshold,)) if presence_only
           else postprocess.FrameStats())
  for chunk in _chunks(frames, _CHUNK):
    for i, prob, presence in predictor.probabilities([f.image for f in chunk]):
      stats.add(prob, presence, chunk[i].truth)
  result = (postprocess.search_presence(stats, start) if presence_only
            else postprocess.search(stats))
  a = stats.arrays()
  before = summarize(stats.per_frame_dice(start), stats.decisions(start),
                     a["truth_area"] > 0)
  return result, before


def score(predictor: inference.Predictor, frames: Iterable[Labelled],
          builder: report.ReportBuilder | None = None) -> tuple[dict[str, Any], list[dict]]:
  """Scores the predictor's calibrated output with the project's Dice; per-frame rows."""
  from nerveseg_jax import metrics  # pylint: disable=g-import-not-at-top
  rows = []
  for chunk in _chunks(frames, _CHUNK):
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


# ---------------------------------------------------------------------------- the face

def _calibrate_segmentation(predictor: inference.Predictor, frames: Iterable[Labelled],
                            workdir: pathlib.Path, *, tta: bool, which: str
                            ) -> tuple[postprocess.SearchResult, dict[str, Any]]:
  """Calibrates a segmentation run alone and saves WORKDIR/calibration.json."""
  result, before = calibrate(predictor, frames)
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
  if config is None:
    config = workdir_lib.read_config(workdir)
  if split not in SPLITS:
    raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
  batch_size = batch_size or int(config.get("eval_batch_size", 8))
  classifier_dir = (pathlib.Path(classifier_workdir).expanduser() if classifier_workdir
                    else None)
  saved = postprocess.load_calibration(workdir)
  skipped: list[dict[str, str]] = []
  if folder:
    source, frames = f"folder {folder}", lambda: _folder_frames(folder, skipped)
  else:
    ids = None if split == "test" else split_ids(config.data, split)
    source, frames = f"split {split}", lambda: _dataset_frames(config.data, split, ids)
  out_dir = workdir / "eval" if (split == "val" and not folder) else (
      workdir / "eval" / ("folder_" + pathlib.Path(folder).name if folder else split))
  out: dict[str, Any] = dict(workdir=str(workdir), source=source, checkpoint=which, tta=tta,
                            checkpoint_step=runinfo.checkpoint_step(workdir, which))
  calibrating = split == "val" and not folder and calibrate_split

  if classifier_dir is None:
    out["classifier_workdir"] = None
    out["pipeline"] = "segmentation only: the run's presence head decides presence"
    predictor = inference.Predictor([workdir], tta=tta, batch_size=batch_size, which=which,
                                    calibration=Calibration())
    if calibrating:
      inference.log(f"calibrating on {source} ...")
      result, before = _calibrate_segmentation(predictor, frames(), workdir, tta=tta,
                                               which=which)
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
      result, _ = _calibrate_segmentation(alone, frames(), workdir, tta=tta, which=which)
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
      result, before = calibrate(predictor, frames(), presence_only=True)
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
  metrics, rows = score(predictor, frames(), builder)
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
  summaries.write_evaluation(workdir, out)  # the run's TensorBoard, beside training's
  out["output_dir"] = str(out_dir)
  return out


def format_table(out: dict[str, Any]) -> str:
  """A readable table: one column per calibration state."""
  columns = []
  if "before_calibration" in out:
    # With a classifier the starting point is the pipeline's saved settings.
    columns.append(("before" if out.get("classifier_workdir") else "default",
                    out["before_calibration"]))
  columns.append(("calibrated" if "before_calibration" in out else "score", out["metrics"]))
  keys = ("kaggle_score", "dice_nerve_frames", "presence_precision", "presence_recall")
  lines = [f"{out['source']}  ({out['metrics']['num_frames']} frames, "
           f"{out['metrics']['num_nerve_frames']} with a nerve)",
           f"{'':<22}" + "".join(f"{name:>12}" for name, _ in columns)]
  for k in keys:
    lines.append(f"{k:<22}" + "".join(
        f"{m[k]:>12.4f}" if m[k] is not None else f"{'n/a':>12}" for _, m in columns))
  for k in ("true_positive", "false_positive", "false_negative", "true_negative"):
    lines.append(f"{k:<22}" + "".join(f"{m['confusion'][k]:>12d}" for _, m in columns))
  for f in out.get("skipped", []):
    lines.append(f"SKIPPED {f['error']}")
  if out.get("classifier_workdir"):
    lines.append(f"pipeline: {out['pipeline']}")
  lines.append(f"calibration: {out['calibration']}")
  if "calibration_search" in out:
    lines.append(f"saved calibration to {out['calibration_search']['saved']}")
  lines.append(f"wrote {out['output_dir']}/metrics.json and report.html")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.parser("nerveseg-evaluate", __doc__.split("\n\n")[0],
                 "unlabelled frames (the Kaggle test set, your own frames): use nerveseg-predict.\n"
                 "example:\n  nerveseg-evaluate --workdir runs/unet_synthetic --tta")
  cli.add_workdir(p, help_text="the trained run to score")
  cli.add_config(p, required=False, help_text="config by name or path[:variant], "
                 "overriding WORKDIR/config.json (e.g. to point at other data)")
  p.add_argument("--split", choices=SPLITS, default="val",
                 help="which labelled frames of the run's data set to score")
  p.add_argument("--folder", default=None,
                 help="a labelled folder (images/ and masks/) instead of a split")
  cli.add_inference(p, batch_size=None, classifier=False)
  p.add_argument("--classifier_workdir", default=None,
                 help="evaluate the two-stage pipeline: this classifier run decides "
                      "presence; on the validation split its presence threshold is "
                      "calibrated and saved to CLASSIFIER_WORKDIR/calibration.json")
  p.add_argument("--no_calibrate", action="store_true",
                 help="on the validation split, score the saved calibration instead")
  return cli.parse(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command; a user's error is one line on stderr and exit status 2."""
  xla_flags.configure()  # before anything starts JAX
  return cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  out = run(args.workdir, config=args.config, split=args.split, folder=args.folder,
            tta=args.tta, batch_size=args.batch_size, which=args.which,
            calibrate_split=not args.no_calibrate,
            classifier_workdir=args.classifier_workdir)
  print(format_table(out))
  return 1 if out.get("skipped") else 0


def run_cli() -> None:
  """Console-script entry (`nerveseg-evaluate`)."""
  sys.exit(main())


if __name__ == "__main__":
  run_cli()
