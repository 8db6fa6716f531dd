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

--levers (for a cross-validation folder) measures out of fold what each inference lever
adds: calibration, the largest component, flip TTA, and with --ensemble_with CV2 (the
same folds trained again, e.g. with another seed) a two-run ensemble per fold.

--folder PATH scores a labelled folder instead: PATH/images/NAME.ext with
PATH/masks/NAME_mask.ext, or Kaggle's flat NAME.tif with NAME_mask.tif. A frame or
mask that cannot be read is named, skipped and listed in metrics.json ("skipped");
the rest are scored and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Sequence

from nerveseg_jax import cli, crossval, scoring
from nerveseg_jax import workdir as workdir_lib

SPLITS = scoring.SPLITS
run = scoring.run  # the library call behind this face (also sweep --evaluate's)
summarize = scoring.summarize


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
  lines.append(f"wrote {out['output_dir']}/metrics.json and " + (
      "per_frame.csv; per fold: cv.md" if "cross_validation" in out else "report.html"))
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.parser("nerveseg-evaluate", __doc__.split("\n\n")[0],
                 "unlabelled frames (the Kaggle test set, your own frames): use nerveseg-predict.\n"
                 "example:\n  nerveseg-evaluate --workdir runs/unet_synthetic --tta")
  cli.add_workdir(p, help_text="the trained run to score, or a cross-validation folder "
                  "(nerveseg-sweep --folds): its folds out of fold on --split val, "
                  "else their ensemble")
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
  p.add_argument("--levers", action="store_true",
                 help="for a cross-validation folder: measure out of fold what calibration, "
                      "the largest component, flip TTA (and with --ensemble_with, a second "
                      "run per fold) add; writes WORKDIR/eval/levers.md and levers.json")
  p.add_argument("--ensemble_with", default=None,
                 help="with --levers: a CV folder of the same folds (e.g. another seed)")
  return cli.parse(p, argv)


def _levers(args: argparse.Namespace) -> int:
  if not args.levers:
    raise ValueError("--ensemble_with needs --levers")
  if not crossval.is_cv_dir(args.workdir):
    raise ValueError(f"--levers: --workdir {args.workdir} is not a cross-validation folder "
                     "(nerveseg-sweep --folds)")
  levers = crossval.inference_levers(args.workdir, args.ensemble_with, args.batch_size)
  table = crossval.render_levers(levers, f"# Inference levers, out of fold: {args.workdir}")
  out_dir = pathlib.Path(args.workdir).expanduser() / "eval"
  out_dir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_text_atomic(out_dir / "levers.json", json.dumps(levers, indent=2) + "\n")
  workdir_lib.write_text_atomic(out_dir / "levers.md", table)
  print(table)
  print(f"wrote {out_dir}/levers.md and levers.json")
  return 0


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.levers or args.ensemble_with:
    return _levers(args)
  out = run(args.workdir, config=args.config, split=args.split, folder=args.folder,
            tta=args.tta, batch_size=args.batch_size, which=args.which,
            calibrate_split=not args.no_calibrate,
            classifier_workdir=args.classifier_workdir)
  print(format_table(out))
  return 1 if out.get("skipped") else 0



if __name__ == "__main__":
  sys.exit(main())
