"""Segment a folder (or one file) of ultrasound frames with trained runs.

  python -m nerveseg_jax.predict --workdir DIR [--workdir DIR2 ...] \
      [--classifier_workdir DIR3] --images PATH --output OUT [--overwrite] [--tta] \
      [--batch_size N]

Writes OUT/submission.csv (Kaggle `img,pixels`), OUT/masks/NAME.png (0/255),
OUT/overlays/NAME.png (mask outline on the frame), OUT/report.html and
OUT/summary.json (counts, the calibration used, and one entry per frame with its
presence, decision and area), and prints the summary. Unreadable files (and frames
that fail in inference) are reported by name and skipped, the others still processed;
the exit status is then 1. Every file in the folder is counted: frames, failures, and
ignored files (non-images, Kaggle *_mask files, hidden files). Frames without a nerve
are reported as "No nerve found".

OUT must be empty or new, so the results of two runs never mix; --overwrite replaces
what predict writes there (the paths in OUTPUTS) and keeps any other file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import shutil
import sys
from typing import Any, Sequence

from nerveseg_jax import cli, imageio, inference, postprocess, report
from nerveseg_jax import workdir as workdir_lib

# Files read and sent to the device per step: bounds host memory on huge folders.
_CHUNK_BATCHES = 4
# Everything predict writes in OUT: what --overwrite replaces, and nothing else.
OUTPUTS = ("masks", "overlays", "submission.csv", "report.html", "summary.json")


class OutputFolderError(ValueError):
  """--output cannot take this run's results (it holds another run's, or is a file)."""


def check_output(output: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
  """OUTPUT as a path; raises OutputFolderError if it is a file, or holds files and
  OVERWRITE is off (the old masks would sit beside the new ones, unlisted)."""
  output = pathlib.Path(output).expanduser()
  if output.exists() and not output.is_dir():
    raise OutputFolderError(f"--output {output} is a file, not a folder")
  if not overwrite and output.is_dir() and any(output.iterdir()):
    raise OutputFolderError(
        f"--output {output} is not empty; give --overwrite to replace the results of a "
        f"previous run there ({', '.join(OUTPUTS)}; other files are kept), or choose a "
        "new folder")
  return output


def _clear_outputs(output: pathlib.Path) -> None:
  """Removes what an earlier predict wrote in OUTPUT (OUTPUTS only: never other files)."""
  for name in OUTPUTS:
    path = output / name
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
      path.unlink()  # a link is removed, never what it points to


def _unique_names(paths: Sequence[pathlib.Path]) -> list[str]:
  """Output names (file stems), unique even when files differ only by extension.

  a.tif and a.png become a_tif and a_png; if such a name is taken too (a file a_tif.png,
  or a.tif beside a.TIF), a counter is appended, so no mask or CSV row overwrites another.
  """
  counts: dict[str, int] = {}
  for p in paths:
    counts[p.stem] = counts.get(p.stem, 0) + 1
  kept = {p.stem for p in paths if counts[p.stem] == 1}  # these keep their own stem
  used: set[str] = set()
  names: list[str] = []
  for p in paths:
    if counts[p.stem] == 1:
      name = p.stem
    else:
      base = name = f"{p.stem}_{p.suffix.lstrip('.').lower()}"
      n = 1
      while name in kept or name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    names.append(name)
  return names


def _predict_chunk(predictor: inference.Predictor, frames: list, names: list[str],
                   paths: list[pathlib.Path], failed: list[dict[str, str]]) -> list:
  """(frame, FramePrediction) for a chunk; a frame that fails in inference is reported.

  The chunk is tried as a whole first; if that fails (say, one huge frame runs the
  device out of memory), each frame is tried alone, so only the frames that fail
  are lost, each reported by its file name.
  """
  out = []
  for frame, path, result in zip(frames, paths, predictor.predict_each(frames, names)):
    if isinstance(result, Exception):
      message = f"{path}: inference failed ({type(result).__name__}: {result})"
      failed.append(dict(file=str(path), error=message))
      inference.log(f"skipped {message}")
    else:
      out.append((frame, result))
  return out


def predict_path(predictor: inference.Predictor, images: str | pathlib.Path,
                 output: str | pathlib.Path, *, overwrite: bool = False) -> dict[str, Any]:
  """Runs `predictor` on every frame under `images` and writes OUT; returns the summary.

  OUT must be empty or new unless OVERWRITE, which first removes the OUTPUTS there.
  """
  paths, ignored = imageio.list_inputs(images)
  output = check_output(output, overwrite)
  if overwrite:
    _clear_outputs(output)
  (output / "masks").mkdir(parents=True, exist_ok=True)
  (output / "overlays").mkdir(parents=True, exist_ok=True)
  names = _unique_names(paths)
  rows: list[tuple[str, str]] = []
  frames_out: list[dict[str, Any]] = []
  failed: list[dict[str, str]] = []
  found = 0
  builder = report.ReportBuilder(f"Predictions for {images}")
  chunk = predictor.batch_size * _CHUNK_BATCHES
  # Counts files: one that cannot be read, or fails in inference, is done all the same.
  for start in cli.progress(range(0, len(paths), chunk), len(paths), "predicted", "files",
                            size=lambda start: len(paths[start:start + chunk])):
    frames, frame_names, frame_paths = [], [], []
    for path, name in zip(paths[start:start + chunk], names[start:start + chunk]):
      try:
        frames.append(imageio.read_gray(path))
        frame_names.append(name)
        frame_paths.append(path)
      except imageio.ImageReadError as e:
        failed.append(dict(file=str(path), error=str(e)))
        inference.log(f"skipped {e}")
    by_name = dict(zip(frame_names, frame_paths))
    for frame, result in _predict_chunk(predictor, frames, frame_names, frame_paths, failed):
      imageio.write_png(output / "masks" / f"{result.name}.png", imageio.mask_png(result.mask))
      imageio.write_png(output / "overlays" / f"{result.name}.png",
                        imageio.overlay(frame, result.mask, caption=postprocess.caption(
                            result.decision, result.presence)))
      builder.add(result.name, frame, result.mask, result.presence, result.decision)
      rows.append((result.name, result.rle()))
      found += result.decision
      frames_out.append(dict(
          name=result.name, file=str(by_name[result.name]), height=int(frame.shape[0]),
          width=int(frame.shape[1]), presence=round(float(result.presence), 6),
          decision=bool(result.decision), message=result.message, area=result.area,
          bbox=list(result.bbox) if result.bbox else None))
  rows.sort(key=lambda r: imageio.natural_key(r[0]))
  frames_out.sort(key=lambda r: imageio.natural_key(r["name"]))
  failed.sort(key=lambda f: imageio.natural_key(pathlib.Path(f["file"]).name))
  table = io.StringIO(newline="")
  writer = csv.writer(table)
  writer.writerow(["img", "pixels"])
  writer.writerows(rows)
  workdir_lib.write_text_atomic(output / "submission.csv", table.getvalue())
  summary = dict(
      input=str(images), output=str(output),
      files=len(paths) + len(ignored), images=len(paths), processed=len(rows),
      nerve_found=found, no_nerve_found=len(rows) - found, failed=len(failed),
      ignored=len(ignored), failures=failed, ignored_files=[str(p) for p in ignored],
      pipeline=predictor.describe(), calibration=predictor.calibration.to_dict(),
      frames=frames_out)
  builder.write(output / "report.html", {k: v for k, v in summary.items()
                                         if not isinstance(v, (list, dict))},
                calibration=summary["calibration"])
  workdir_lib.write_text_atomic(output / "summary.json", json.dumps(summary, indent=2) + "\n")
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"{'files':<16}{summary['files']}",
           f"{'processed':<16}{summary['processed']}",
           f"{'nerve found':<16}{summary['nerve_found']}",
           f"{inference.NO_NERVE:<16}{summary['no_nerve_found']}",
           f"{'failed':<16}{summary['failed']}",
           f"{'ignored':<16}{summary['ignored']}  (non-image, *_mask or hidden files)"]
  for f in summary["failures"]:
    lines.append(f"  FAILED {f['error']}")
  lines.append(f"wrote {summary['output']}/submission.csv, masks/, overlays/, report.html")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.parser("nerveseg-predict", __doc__.split("\n\n")[0],
                 "example:\n  nerveseg-predict --workdir runs/unet --images ~/kaggle/test "
                 "--output out/\n  -> out/submission.csv, out/masks/, out/overlays/, "
                 "out/report.html, out/summary.json")
  cli.add_workdir(p, multiple=True, help_text="segmentation run, or a cross-validation "
                  "folder (nerveseg-sweep --folds: its folds); repeat to ensemble")
  p.add_argument("--images", required=True, help="a folder of frames or one frame")
  p.add_argument("--output", required=True,
                 help="output FOLDER (empty or new); submission.csv is written inside it")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the results of an earlier predict in --output "
                      f"({', '.join(OUTPUTS)}); other files there are kept")
  cli.add_inference(p)
  return cli.parse(p, argv)


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if pathlib.Path(args.output).suffix.lower() == ".csv":
    raise ValueError(f"--output {args.output}: give a folder; predict writes "
                     "submission.csv (and masks/, overlays/, report.html) inside it")
  paths, _ = imageio.list_inputs(args.images)
  if not paths:
    raise FileNotFoundError(f"--images {args.images}: no tif/png/jpg frames found")
  check_output(args.output, args.overwrite)  # before the models load: a quick refusal
  predictor = inference.Predictor(args.workdir, args.classifier_workdir, tta=args.tta,
                                  batch_size=args.batch_size, which=args.which)
  inference.log(predictor.describe())
  summary = predict_path(predictor, args.images, args.output, overwrite=args.overwrite)
  print(format_summary(summary))
  return 1 if summary["failed"] else 0



if __name__ == "__main__":
  sys.exit(main())
