"""K-fold cross-validation folders: out-of-fold scoring, one calibration, and the summary.

A CV folder DIR (made by `nerveseg-sweep --folds K`) holds:
  DIR/fold_<k>/         an ordinary training workdir, trained with data.fold = k
  DIR/cv.json, cv.md    every fold scored on its own validation subjects at the frames'
                        own size, and mean ± sd over folds (Kaggle score, nerve Dice)
  DIR/calibration.json  the post-processing chosen on all folds' out-of-fold
                        predictions together
  DIR/eval/per_frame.csv  each frame's out-of-fold result
predict, evaluate and serve accept DIR as --workdir: inference.Predictor ensembles the
folds (mean of their probabilities) with DIR/calibration.json.

Folds are scored at their *latest* checkpoint: a fold's "best" was chosen on the very
frames it would be scored on. Each fold is scored uncalibrated (`default`) and with the
out-of-fold calibration (`calibrated`; chosen on these frames, so slightly optimistic,
equally for every setting compared).
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from nerveseg_jax import cli, postprocess
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.postprocess import Calibration

CV_FILE = "cv.json"
CV_TABLE = "cv.md"
CHECKPOINT = "latest"
METRICS = ("kaggle_score", "dice_nerve_frames")


class CrossValError(ValueError):
  """A CV folder is incomplete or inconsistent (names the folder and what is wrong)."""


def fold_name(fold: int) -> str:
  return f"fold_{fold}"


def is_cv_dir(path: str | pathlib.Path) -> bool:
  """Whether PATH is a CV folder (cv.json, and no config.json of its own)."""
  path = pathlib.Path(path).expanduser()
  return (path / CV_FILE).is_file() and not (path / workdir_lib.CONFIG_FILE).exists()


def read(cv_dir: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(cv_dir).expanduser() / CV_FILE
  try:
    cv = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CrossValError(f"{path}: not a readable cross-validation summary ({e})") from None
  if not isinstance(cv, dict) or not isinstance(cv.get("per_fold"), list):
    raise CrossValError(f"{path}: no 'per_fold' list; not written by nerveseg-sweep --folds")
  return cv


def fold_workdirs(cv_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """The scored folds' workdirs of CV_DIR, in fold order; an error if one is missing."""
  cv_dir = pathlib.Path(cv_dir).expanduser()
  cv = read(cv_dir)
  dirs = [cv_dir / f["workdir"] for f in cv["per_fold"] if f.get("status") == "ok"]
  if not dirs:
    raise CrossValError(f"{cv_dir}: no fold finished; run the sweep --folds command again")
  for d in dirs:
    if not (d / workdir_lib.CONFIG_FILE).is_file():
      raise CrossValError(f"{cv_dir}: {d.name} is listed in {CV_FILE} but holds no run")
  return dirs


def describe(cv_dir: str | pathlib.Path) -> str:
  """'3 of 5 folds' for log lines and the page."""
  cv = read(cv_dir)
  done = sum(f.get("status") == "ok" for f in cv["per_fold"])
  return f"{done} of {cv['num_folds']} folds"


def fold_config(config, num_folds: int, fold: int):
  """CONFIG with data.num_folds and data.fold set: fold FOLD of a NUM_FOLDS-fold split."""
  from nerveseg_jax.data import folds  # pylint: disable=g-import-not-at-top
  folds.check(num_folds, fold)
  config = config.copy_and_resolve_references()
  config.data.num_folds, config.data.fold = int(num_folds), int(fold)
  return config


def parse_folds(num_folds: int, only: str = "") -> list[int]:
  """The folds to train: all of NUM_FOLDS, or the comma-separated ONLY ('0,1')."""
  if num_folds < 2:
    raise CrossValError(f"--folds must be >= 2, got {num_folds}")
  if not only:
    return list(range(num_folds))
  try:
    picked = sorted({int(s) for s in only.split(",") if s.strip()})
  except ValueError:
    raise CrossValError(f"--fold_ids must be comma-separated integers, got {only!r}") from None
  bad = [k for k in picked if not 0 <= k < num_folds]
  if bad or not picked:
    raise CrossValError(f"--fold_ids {only!r}: each must be in 0..{num_folds - 1}")
  return picked


def _mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
  v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
  if not v:
    return None, None
  return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def fold_stats(workdirs: Sequence[pathlib.Path], *, tta: bool = False,
               batch_size: int | None = None, label: str = "scored"
               ) -> tuple[postprocess.FrameStats, list[str]]:
  """Calibration statistics of WORKDIRS (one fold's run, or several runs of the same
  fold, ensembled) on that fold's validation frames, at the frames' own size."""
  from nerveseg_jax import inference  # pylint: disable=g-import-not-at-top
  from nerveseg_jax.data import labelled  # pylint: disable=g-import-not-at-top
  config = workdir_lib.read_config(workdirs[0])
  ids = labelled.split_ids(config.data, "val")
  for w in workdirs[1:]:
    other = workdir_lib.read_config(w).data
    if (other.num_folds, other.fold) != (config.data.num_folds, config.data.fold):
      raise CrossValError(f"{w} is fold {other.fold} of {other.num_folds}, {workdirs[0]} "
                          f"fold {config.data.fold} of {config.data.num_folds}: not one fold")
  predictor = inference.Predictor(
      list(workdirs), tta=tta, batch_size=batch_size or int(config.eval_batch_size),
      which=CHECKPOINT, calibration=Calibration())
  stats, names = postprocess.FrameStats(), []
  frames = labelled.dataset_frames(config.data, "val", ids)
  for chunk in cli.progress(labelled.chunks(frames, 64), len(ids), label, size=len):
    for i, prob, presence in predictor.probabilities([c.image for c in chunk]):
      stats.add(prob, presence, chunk[i].truth)
      names.append(chunk[i].name)
  return stats, names


def score_folds(cv_dir: str | pathlib.Path, folds: Sequence[dict[str, Any]], *,
                num_folds: int, tta: bool = False, batch_size: int | None = None
                ) -> dict[str, Any]:
  """Scores every finished fold out of fold, calibrates on all of them, writes the files.

  FOLDS: one dict per trained fold, {"fold", "workdir" (a Path), "status", and
  optionally "wall_seconds", "steps"}; only status "ok" is scored. Returns cv.json's dict.
  """
  from nerveseg_jax import scoring  # pylint: disable=g-import-not-at-top
  cv_dir = pathlib.Path(cv_dir).expanduser()
  per_fold, stats, names = [], [], []
  for f in folds:
    row = {"fold": int(f["fold"]), "workdir": pathlib.Path(f["workdir"]).name,
           "status": f.get("status", "ok"), "steps": f.get("steps"),
           "wall_seconds": f.get("wall_seconds")}
    per_fold.append(row)
    if row["status"] != "ok":
      continue
    s, fold_names = fold_stats([f["workdir"]], tta=tta, batch_size=batch_size,
                               label=f"fold {row['fold']} scored")
    row.update(step=workdir_lib.checkpoint_steps(f["workdir"])[-1], frames=len(s),
               nerve_frames=int((s.arrays()["truth_area"] > 0).sum()))
    stats.append((row, s))
    names.append(fold_names)
  if not stats:
    raise CrossValError(f"{cv_dir}: no fold finished training; nothing to score")
  merged = postprocess.FrameStats()
  for _, s in stats:
    merged.extend(s)
  search = postprocess.search(merged)
  cal = search.calibration
  for row, s in stats:
    for label, c in (("default", Calibration()), ("calibrated", cal)):
      m = scoring.summarize(s.per_frame_dice(c), s.decisions(c), s.arrays()["truth_area"] > 0)
      row[label] = {k: m[k] for k in (*METRICS, "presence_precision", "presence_recall")}
  cv: dict[str, Any] = {
      "num_folds": int(num_folds), "folds": [r["fold"] for r in per_fold],
      "complete": len(stats) == num_folds, "checkpoint": CHECKPOINT, "tta": bool(tta),
      "per_fold": per_fold, "calibration": cal.to_dict()}
  for label in ("default", "calibrated"):
    for k in METRICS:
      mean, sd = _mean_sd([r[label][k] for r, _ in stats])
      cv.setdefault("mean", {}).setdefault(label, {})[k] = mean
      cv.setdefault("sd", {}).setdefault(label, {})[k] = sd
  oof = {}
  for label, c in (("default", Calibration()), ("calibrated", cal)):
    oof[label] = scoring.summarize(merged.per_frame_dice(c), merged.decisions(c),
                                   merged.arrays()["truth_area"] > 0)
  cv["out_of_fold"] = oof
  _write(cv_dir, cv, search, stats, names)
  return cv


def _write(cv_dir: pathlib.Path, cv: dict[str, Any], search, stats, names) -> None:
  postprocess.save_calibration(cv_dir, search.calibration, dict(
      before=search.default_score, after=search.score, frames=search.num_frames,
      grid_size=search.grid_size, tta=cv["tta"], checkpoint=CHECKPOINT,
      source="out-of-fold predictions of " + ", ".join(r["workdir"] for r, _ in stats)))
  table = io.StringIO(newline="")
  writer = csv.writer(table)
  writer.writerow(["fold", "name", "dice", "presence", "found", "has_nerve", "truth_area"])
  for (row, s), fold_names in zip(stats, names):
    a = s.arrays()
    dice, found = s.per_frame_dice(search.calibration), s.decisions(search.calibration)
    for j, name in enumerate(fold_names):
      writer.writerow([row["fold"], name, f"{dice[j]:.6f}", f"{a['presence'][j]:.6f}",
                       int(found[j]), int(a["truth_area"][j] > 0), int(a["truth_area"][j])])
  (cv_dir / "eval").mkdir(parents=True, exist_ok=True)
  workdir_lib.write_text_atomic(cv_dir / "eval" / "per_frame.csv", table.getvalue())
  workdir_lib.write_text_atomic(cv_dir / CV_FILE, json.dumps(jsonable(cv), indent=2) + "\n")
  workdir_lib.write_text_atomic(cv_dir / CV_TABLE, render(cv, f"# Cross-validation: {cv_dir.name}"))


def jsonable(x: Any) -> Any:
  """X with NaN and inf as None (JSON null) and numpy scalars as Python ones."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if hasattr(x, "item"):
    return jsonable(x.item())  # a numpy NaN becomes a float NaN, then None
  return x


def _f(v: Any, digits: int = 3) -> str:
  return "-" if v is None else f"{v:.{digits}f}"


def mean_sd_text(mean: float | None, sd: float | None) -> str:
  return "-" if mean is None else (f"{mean:.3f} ± {sd:.3f}" if sd is not None
                                   else f"{mean:.3f}")


def render(cv: dict[str, Any], header: str) -> str:
  """cv.md: one row per fold, then mean ± sd (sample sd over folds)."""
  lines = [header, "",
           f"{len([r for r in cv['per_fold'] if r['status'] == 'ok'])} of {cv['num_folds']} "
           f"folds scored on their own validation subjects at the frames' own size, "
           f"{cv['checkpoint']} checkpoint, TTA {'on' if cv['tta'] else 'off'}. "
           "`default`: uncalibrated; `calibrated`: with the post-processing chosen on all "
           "folds' out-of-fold predictions "
           f"(`{json.dumps(cv['calibration'])}`).", "",
           "| fold | frames | nerve frames | step | Kaggle (default) | nerve Dice (default) "
           "| Kaggle (calibrated) | nerve Dice (calibrated) | train wall (s) | status |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in cv["per_fold"]:
    d, c = r.get("default", {}), r.get("calibrated", {})
    wall = r.get("wall_seconds")
    lines.append(
        f"| {r['fold']} | {r.get('frames', '-')} | {r.get('nerve_frames', '-')} | "
        f"{r.get('step', '-')} | {_f(d.get('kaggle_score'))} | "
        f"{_f(d.get('dice_nerve_frames'))} | {_f(c.get('kaggle_score'))} | "
        f"{_f(c.get('dice_nerve_frames'))} | {'-' if wall is None else f'{wall:.0f}'} | "
        f"{r['status']} |")
  m, s = cv["mean"], cv["sd"]
  lines.append(
      "| **mean ± sd** | | | | " + " | ".join(
          f"**{mean_sd_text(m[label][k], s[label][k])}**"
          for label in ("default", "calibrated") for k in METRICS) + " | | |")
  return "\n".join(lines) + "\n"


def paired_difference(base: dict[str, Any], other: dict[str, Any], label: str, metric: str
                      ) -> dict[str, Any]:
  """OTHER minus BASE, fold by fold over the folds both scored: mean, sd, n.

  Pairing by fold removes the between-subject spread that both share, so this is the
  difference's own noise, not the folds' spread.
  """
  def by_fold(cv):
    return {r["fold"]: r[label][metric] for r in cv["per_fold"]
            if r.get("status") == "ok" and isinstance(r.get(label, {}).get(metric), float)}
  a, b = by_fold(base), by_fold(other)
  diffs = [b[k] - a[k] for k in sorted(set(a) & set(b))]
  mean, sd = _mean_sd(diffs)
  return {"mean": mean, "sd": sd, "n": len(diffs)}


def noise_floor(diff: dict[str, Any], seed_noise: float | None) -> float | None:
  """What a difference must exceed to count: twice its standard error over the paired
  folds, and at least the base's seed-to-seed difference where the study measured one."""
  if diff["mean"] is None or diff["sd"] is None:
    return seed_noise
  se2 = 2.0 * diff["sd"] / math.sqrt(diff["n"])
  return max(se2, seed_noise or 0.0)


def render_study(cvs: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]],
                 base: str, header: str, noise_run: str | None = None,
                 metric: str = "dice_nerve_frames", label: str = "calibrated") -> str:
  """The sweep-of-CVs table: mean ± sd per setting, and its paired difference from BASE.

  Settings are compared by LABEL's METRIC: "calibrated" by default, because the
  uncalibrated score moves with where a run's probabilities happen to cross 0.5 (its
  seed-to-seed spread is several times the calibrated one's). A difference "counts"
  when |mean| exceeds noise_floor; NOISE_RUN (the base repeated with another seed)
  sets the seed floor.
  """
  other = "default" if label == "calibrated" else "calibrated"
  names = {"default": "uncalibrated", "calibrated": "calibrated"}
  seed = None
  if noise_run and noise_run in cvs and base in cvs:
    seed_diff = paired_difference(cvs[base], cvs[noise_run], label, metric)["mean"]
    seed = abs(seed_diff) if seed_diff is not None else None
  lines = [header, "",
           f"Each setting: mean ± sd over its folds of `{metric}` at the frames' own size, "
           "uncalibrated and calibrated (the post-processing chosen on the setting's "
           f"out-of-fold predictions). Δ: paired by fold against `{base}`, mean ± sd; the "
           f"{names[label]} Δ counts when |Δ| > 2·sd/√n"
           + (f" and > the seed difference of `{noise_run}` ({_f(seed)})" if seed is not None
              else "") + ".", "",
           "| setting | overrides | folds | uncalibrated | calibrated | "
           f"Δ {names[label]} | noise | counts? | Δ {names[other]} | "
           "train wall per fold (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]

  def delta_text(d):
    if not d or d["mean"] is None:
      return "-"
    return ("+" if d["mean"] >= 0 else "") + mean_sd_text(d["mean"], d["sd"])

  for name, cv in cvs.items():
    ok = [r for r in cv["per_fold"] if r.get("status") == "ok"]
    walls = [r["wall_seconds"] for r in ok if r.get("wall_seconds")]
    ov = ", ".join(f"`{k}={v}`" for k, v in overrides.get(name, {}).items()) or "(base)"
    if name == base or base not in cvs:
      delta = noise = counts = delta_other = "-"
    else:
      d = paired_difference(cvs[base], cv, label, metric)
      floor = noise_floor(d, seed)
      delta, noise = delta_text(d), _f(floor)
      counts = ("-" if floor is None or d["mean"] is None
                else ("yes" if abs(d["mean"]) > floor else "no"))
      delta_other = delta_text(paired_difference(cvs[base], cv, other, metric))
    lines.append(
        f"| {name} | {ov} | {len(ok)} | "
        f"{mean_sd_text(cv['mean']['default'][metric], cv['sd']['default'][metric])} | "
        f"{mean_sd_text(cv['mean']['calibrated'][metric], cv['sd']['calibrated'][metric])} | "
        f"{delta} | {noise} | {counts} | {delta_other} | "
        f"{'-' if not walls else f'{np.mean(walls):.0f}'} |")
  return "\n".join(lines) + "\n"


def _fold_config(cv_dir: pathlib.Path, cv: dict[str, Any]) -> dict[str, Any]:
  """CV_DIR's training config (its first scored fold's), as dotted keys without the fold."""
  first = next((f for f in cv["per_fold"] if f.get("status") == "ok"), None)
  if first is None:
    raise CrossValError(f"{cv_dir}: no fold finished; run the sweep --folds command again")
  config = workdir_lib.flat_config(
      json.loads((cv_dir / first["workdir"] / workdir_lib.CONFIG_FILE).read_text()))
  config.pop("data.fold", None)
  return config


def compare(cv_dirs: Sequence[str | pathlib.Path]) -> tuple[dict[str, dict[str, Any]], str]:
  """Compares CV folders made apart (e.g. two recipes) as a sweep of CVs compares its
  settings: each one's mean ± sd, and its difference from the first, paired by fold.

  Each folder's overrides column lists the config keys that differ from the first's; a
  difference counts when it clears twice its paired standard error. Returns (cvs by
  name, the markdown table).
  """
  dirs = [pathlib.Path(d).expanduser() for d in cv_dirs]
  if len(dirs) < 2:
    raise CrossValError("--compare needs at least two CV folders (the first is the base)")
  for d in dirs:
    if not is_cv_dir(d):
      raise CrossValError(f"{d}: not a CV folder (no {CV_FILE}); make it with "
                          "nerveseg-sweep --folds K")
  names = [d.name for d in dirs]
  if len(set(names)) < len(names):  # e.g. runs/a/cv and runs/b/cv
    names = [str(d) for d in dirs]
  cvs = {n: read(d) for n, d in zip(names, dirs)}
  base_cv = cvs[names[0]]
  for n, d in zip(names[1:], dirs[1:]):
    if cvs[n]["num_folds"] != base_cv["num_folds"]:
      raise CrossValError(f"{d}: a {cvs[n]['num_folds']}-fold split, but {dirs[0]} is "
                          f"{base_cv['num_folds']}-fold; folds of different splits "
                          "cannot be paired")
  configs = {n: _fold_config(d, cvs[n]) for n, d in zip(names, dirs)}
  base = configs[names[0]]
  overrides = {n: {k: v for k, v in sorted(c.items()) if base.get(k, "<missing>") != v}
               for n, c in configs.items()}
  table = render_study(cvs, overrides, names[0], f"# {' vs '.join(names)}")
  return cvs, table


def inference_levers(cv_dir: str | pathlib.Path, partner: str | pathlib.Path | None = None,
                     batch_size: int | None = None) -> dict[str, Any]:
  """Out of fold, what each inference lever adds to CV_DIR's folds (nothing is written).

  Rows: uncalibrated; calibrated without, then with, the largest-component option;
  flip TTA; and, with PARTNER (a CV folder of the same folds, e.g. another seed), the
  two runs of each fold ensembled, without and with TTA. Each row is calibrated on the
  pooled out-of-fold frames of its own predictions; per-fold nerve Dice (mean ± sd)
  and the pooled Kaggle score.
  """
  from nerveseg_jax import scoring  # pylint: disable=g-import-not-at-top
  cv_dir = pathlib.Path(cv_dir).expanduser()
  folds = fold_workdirs(cv_dir)
  pairs = None
  if partner is not None:
    partner = pathlib.Path(partner).expanduser()
    theirs = {pathlib.Path(w).name: w for w in fold_workdirs(partner)}
    pairs = [[w, theirs[w.name]] for w in folds if w.name in theirs]
    if not pairs:
      raise CrossValError(f"{partner} has none of the folds of {cv_dir}")
  settings = [("uncalibrated", [[w] for w in folds], False, None),
              ("calibrated, no largest component", [[w] for w in folds], False, False),
              ("calibrated", [[w] for w in folds], False, True),
              ("calibrated + flip TTA", [[w] for w in folds], True, True)]
  if pairs:
    settings += [("calibrated + 2-run ensemble", pairs, False, True),
                 ("calibrated + 2-run ensemble + flip TTA", pairs, True, True)]
  cache: dict[tuple, list] = {}
  rows = []
  for name, groups, tta, largest in settings:
    key = (tuple(len(g) for g in groups), tta)
    if key not in cache:
      cache[key] = [fold_stats(g, tta=tta, batch_size=batch_size, label=f"{name}: scored")[0]
                    for g in groups]
    per_fold = cache[key]
    merged = postprocess.FrameStats()
    for s in per_fold:
      merged.extend(s)
    cal = (Calibration() if largest is None else
           postprocess.search(merged, allow_largest_component=largest).calibration)
    dice = [float(s.per_frame_dice(cal)[s.arrays()["truth_area"] > 0].mean())
            for s in per_fold]
    pooled = scoring.summarize(merged.per_frame_dice(cal), merged.decisions(cal),
                               merged.arrays()["truth_area"] > 0)
    mean, sd = _mean_sd(dice)
    rows.append(dict(setting=name, folds=len(per_fold), nerve_dice_per_fold=dice,
                     nerve_dice_mean=mean, nerve_dice_sd=sd,
                     kaggle_score=pooled["kaggle_score"], calibration=cal.to_dict()))
  return {"cv_dir": str(cv_dir), "partner": str(partner) if partner else None, "rows": rows}


def render_levers(levers: dict[str, Any], header: str) -> str:
  lines = [header, "", "| inference | folds | nerve Dice, mean ± sd over folds | Kaggle "
           "(pooled) | calibration |", "|---|---|---|---|---|"]
  for r in levers["rows"]:
    lines.append(f"| {r['setting']} | {r['folds']} | "
                 f"{mean_sd_text(r['nerve_dice_mean'], r['nerve_dice_sd'])} | "
                 f"{_f(r['kaggle_score'])} | `{json.dumps(r['calibration'])}` |")
  return "\n".join(lines) + "\n"
