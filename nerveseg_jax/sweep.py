"""Hyper-parameter sweeps: one config trained under a list of overrides, then tabulated.

  python -m nerveseg_jax.sweep --config configs/unet.py:folder \\
      --sweep configs/sweeps/real_subset.py [--workdir runs/sweep_real_subset] \\
      [--metric nerve_dice] [--evaluate] [--config.KEY=VALUE ...]

A sweep file defines ``get_sweep(arg)`` returning
``{"base": {key: value}, "runs": [{"name": ..., key: value}, ...], "metric": ...}``
with dotted config keys (``data.image_size``, ``loss.dice``); "metric" is optional.
A run's config is the --config file, then the sweep's base, then the command line's
``--config.KEY`` overrides, then the run's own keys. Every run's config is built and
checked before the first one trains.

Each run trains with ``trainer.train_and_evaluate`` in WORKDIR/<name>, one after another;
WORKDIR/sweep.md and sweep.json are rewritten after every run. Run the same command
again after an interruption: finished runs are read back (WORKDIR/<name>/sweep_result.json),
a preempted or killed one resumes from its checkpoint, and its evaluations so far are in
its val_history.jsonl. A workdir trained with a different config is an error, not
reused. Runs are ranked by the metric at the last evaluation (``--metric``, else the
sweep file's, else the one train.py keeps the best checkpoint by). train evaluates at
the network's resolution; ``--evaluate`` also scores each run's last checkpoint with
``nerveseg_jax.evaluate`` at the frames' own size, as Kaggle does, and ranks by that
(needed to compare resolutions fairly).

Cross-validation (crossval.py has the folder's layout):
  python -m nerveseg_jax.sweep --config CONFIG --folds K [--fold_ids 0,1] [--workdir DIR]
trains fold k of a K-fold subject-wise split into DIR/fold_<k> for every k (or only
--fold_ids), then scores every fold out of fold at the frames' own size and writes
DIR/cv.md, cv.json and the out-of-fold calibration.json; predict, evaluate and serve
take DIR as --workdir and ensemble its folds. With --sweep as well, every run of the
sweep file is such a CV folder, WORKDIR/<name>, and sweep.md compares the settings by
mean ± sd over folds with each one's paired difference from the base and its noise.
Re-running resumes in both cases.

  python -m nerveseg_jax.sweep --compare DIR_A DIR_B [...]
compares CV folders made apart (two recipes, say) in the same table, each paired by
fold against DIR_A, with the config keys in which it differs; it trains nothing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from nerveseg_jax import cli, crossval
from nerveseg_jax import workdir as workdir_lib

log = logging.getLogger("nerveseg_jax.sweep")

RESULT_FILE = "sweep_result.json"
# train's validation metrics are at the network's resolution; evaluate's, at the frames'
# own size (what Kaggle scores). The names of the same quantity in the two:
SOURCE_METRIC = {"nerve_dice": "dice_nerve_frames", "kaggle_score": "kaggle_score"}
_TABLES = ("sweep.md", "sweep.json")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
LOWER_IS_BETTER = ("loss",)


class SweepError(ValueError):
  """A sweep file, one of its runs or its workdir is wrong (names the file, run and key)."""


class Preempted(Exception):
  """SIGTERM reached a run: its checkpoint is saved; the same command resumes the sweep."""


def _is_writer() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _write_json(path, obj: Any) -> None:
  workdir_lib.write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def load_sweep(path: str | os.PathLike, arg: str = "") -> dict[str, Any]:
  """Imports SWEEP_FILE and returns get_sweep(arg), checked."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise SweepError(f"sweep file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"sweep file {path} has no get_sweep(arg) function")
  sweep = module.get_sweep(arg)
  if (not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list)
      or not isinstance(sweep.get("base", {}), dict)):
    raise SweepError(f"{path}: get_sweep must return {{'base': {{...}}, 'runs': [...]}}")
  names = [r.get("name") if isinstance(r, dict) else None for r in sweep["runs"]]
  for i, name in enumerate(names):
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _TABLES:
      raise SweepError(f"{path}: run {i} needs a 'name' usable as a folder name "
                       f"(letters, digits, _ . + -), got {name!r}")
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f"{path}: run names must be unique; repeated: {', '.join(dupes)}")
  sweep.setdefault("base", {})
  return sweep


def get_key(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                    where: str) -> ml_collections.ConfigDict:
  """A copy of CONFIG with dotted-key OVERRIDES set; an unknown key is an error naming it."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise SweepError(f"{where}: unknown config key {key!r}")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise SweepError(f"{where}: unknown config key {key!r}")
    if isinstance(value, list):
      value = tuple(value)  # JSON round trips turn image_size tuples into lists
    try:
      setattr(node, leaf, value)  # ConfigDict keeps each key's type: 0.5 into an int fails
    except TypeError as e:
      raise SweepError(f"{where}: config key {key!r}: {e}") from None
  return config


def score(history: list[dict[str, Any]], metric: str) -> dict[str, Any]:
  """final (the last evaluation's value), best and best_step of METRIC over HISTORY."""
  final = history[-1].get(metric) if history else None
  valid = [(h[metric], h["step"]) for h in history
           if isinstance(h.get(metric), (int, float)) and math.isfinite(h[metric])]
  pick = min if metric in LOWER_IS_BETTER else max
  best = pick(valid, key=lambda vs: vs[0]) if valid else (None, None)
  return {"final": final, "best": best[0], "best_step": best[1]}


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
  keys = []
  for k in sorted(set(a) | set(b)):
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      keys += _config_diff(a[k], b[k], f"{prefix}{k}.")
    elif a.get(k) != b.get(k):
      keys.append(f"{prefix}{k}")
  return keys


def _check_workdir(config: ml_collections.ConfigDict, workdir, where: str) -> None:
  """A run's workdir holds nothing, or a run of exactly this config (to read or resume)."""
  saved = workdir / workdir_lib.CONFIG_FILE
  if saved.exists():
    diff = _config_diff(json.loads(saved.read_text()), workdir_lib.config_to_dict(config))
    if diff:
      raise SweepError(f"{where}: {workdir} was trained with another config (keys "
                       f"{', '.join(diff)}); delete it or rename the run")


def _evaluate_at_source_size(workdir, metric: str) -> dict[str, Any]:
  """The run's last checkpoint scored by scoring.run (what nerveseg-evaluate runs) on its validation fold, uncalibrated."""
  from nerveseg_jax import scoring  # pylint: disable=g-import-not-at-top
  out = scoring.run(str(workdir), split="val", which="latest", calibrate_split=False)
  keys = ("kaggle_score", "dice_nerve_frames", "presence_precision", "presence_recall")
  m = {k: out["metrics"].get(k) for k in keys}
  return {"source_size": m, "source_final": m.get(SOURCE_METRIC[metric])}


def run_one(config: ml_collections.ConfigDict, run: dict[str, Any], workdir,
            metric: str, where: str, at_source_size: bool = False) -> dict[str, Any]:
  """Trains one run (or reads back its finished result) and returns its summary."""
  from nerveseg_jax import trainer  # pylint: disable=g-import-not-at-top
  overrides = crossval.jsonable({k: v for k, v in run.items() if k != "name"})
  result_path = workdir / RESULT_FILE
  if result_path.exists():
    try:
      done = json.loads(result_path.read_text())
    except ValueError as e:
      raise SweepError(f"{where}: {result_path} is unreadable ({e}); delete it to redo "
                       "the run's bookkeeping (its checkpoint is kept)") from None
    if done.get("status") in ("ok", "diverged"):
      log.info("%s: finished earlier, read from %s", where, result_path)
      # Scored again: the metric may differ from the one of the first reading.
      done.update(score(done.get("val_history", []), metric))
      if at_source_size and done["status"] == "ok":
        if "source_size" in done:
          done["source_final"] = done["source_size"].get(SOURCE_METRIC[metric])
        else:  # trained by a sweep without --evaluate: score it now, once
          done.update(_evaluate_at_source_size(workdir, metric))
          if _is_writer():
            _write_json(result_path, crossval.jsonable(done))
      return done
  t0 = time.perf_counter()
  summary: dict[str, Any] = {"name": run["name"], "overrides": overrides}
  try:
    result = trainer.train_and_evaluate(config, workdir)
  except trainer.NonFiniteLossError as e:
    # A diverging setting is a result of the sweep, not a reason to stop it.
    summary.update(status="diverged", error=str(e), steps=None)
  except (ValueError, FileNotFoundError, trainer.WorkdirError) as e:
    raise SweepError(f"{where} ({workdir}): {e}") from e
  else:
    if result.get("preempted"):
      raise Preempted(str(workdir))
    summary.update(status="ok", steps=int(result["step"]),
                   train_loss=result.get("train_loss"))
  history = workdir_lib.read_val_history(workdir)
  summary.update(wall_seconds=time.perf_counter() - t0, val_history=history,
                 **score(history, metric))
  if summary["status"] == "ok" and not history:
    summary["status"] = "no_validation"  # e.g. data.fold=-1, or evals never recorded
  if at_source_size and summary["status"] == "ok":
    summary.update(_evaluate_at_source_size(workdir, metric))
  summary = crossval.jsonable(summary)
  if _is_writer():
    _write_json(result_path, summary)
  return summary


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4f}"
  return str(v)


def rank(summaries: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
  """Best first by the last evaluation's METRIC, at source size where the sweep scored
  it there; runs without a value (diverged) last."""
  sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
  field = "source_final" if any("source_final" in s for s in summaries) else "final"
  def key(s):
    v = s.get(field)
    return (0, sign * v) if isinstance(v, (int, float)) and math.isfinite(v) else (1, 0.0)
  return sorted(summaries, key=key)


def render_table(summaries: list[dict[str, Any]], metric: str, header: str) -> str:
  """A markdown table, ranked (see rank), with METRIC at every evaluated step."""
  steps = sorted({h["step"] for s in summaries for h in s.get("val_history", [])})
  source = any("source_final" in s for s in summaries)
  cols = ["rank", "run", "overrides", *[f"step {st}" for st in steps], "best (step)",
          *(["at source size"] if source else []), "wall s", "status"]
  better = "lower" if metric in LOWER_IS_BETTER else "higher"
  where = (f"at the last step, scored by `evaluate` at the frames' own size "
           f"(`{SOURCE_METRIC.get(metric)}`, uncalibrated)" if source else
           "at the last evaluation")
  lines = [header, "", f"Ranked by validation `{metric}` ({better} is better) {where}; "
           "the step columns are train's evaluations at the network's resolution.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for i, s in enumerate(rank(summaries, metric), 1):
    by_step = {h["step"]: h.get(metric) for h in s.get("val_history", [])}
    overrides = ", ".join(f"`{k}={v}`" for k, v in s["overrides"].items()) or "(base)"
    best = (f"{_fmt(s.get('best'))} ({s.get('best_step')})" if s.get("best") is not None
            else "-")
    wall = s.get("wall_seconds")
    lines.append("| " + " | ".join([
        str(i), s["name"], overrides, *[_fmt(by_step.get(st)) for st in steps], best,
        *([_fmt(s.get("source_final"))] if source else []),
        f"{wall:.0f}" if wall is not None else "-", s.get("status", "?")]) + " |")
  return "\n".join(lines) + "\n"


def _metric_names(classifier: bool) -> set[str]:
  from nerveseg_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  cls = metrics_lib.ClassifierEvalMetrics if classifier else metrics_lib.EvalMetrics
  return set(cls.__annotations__) | {"images_per_sec"}


def run_sweep(config: ml_collections.ConfigDict, sweep: dict[str, Any], workdir,
              metric: str | None = None, title: str = "sweep",
              overrides: dict[str, Any] | None = None, at_source_size: bool = False
              ) -> tuple[list[dict[str, Any]], str]:
  """Trains every run of SWEEP in WORKDIR/<name>; writes sweep.json and sweep.md.

  OVERRIDES (the command line's --config.KEY values) apply after the sweep's base and
  before each run's keys. AT_SOURCE_SIZE also scores each run's last checkpoint with
  `evaluate` at the frames' own size, and ranks by that: train's validation is at the
  network's resolution, which flatters low resolutions. Returns (summaries in sweep
  order, the metric ranked by).
  """
  from nerveseg_jax import sharding, train_state  # pylint: disable=g-import-not-at-top
  # Before anything touches a JAX backend: a multi-process sweep is one distributed job.
  sharding.maybe_initialize_distributed()
  workdir = workdir_lib.as_path(workdir)
  base = apply_overrides(config, sweep.get("base", {}), f"{title} (base)")
  base = apply_overrides(base, overrides or {}, f"{title} (--config overrides)")
  classifier = train_state.is_classifier(base)
  metric = metric or sweep.get("metric") or (
      "presence_accuracy" if classifier else "kaggle_score")
  if metric not in _metric_names(classifier):
    raise SweepError(f"{title}: unknown metric {metric!r}; one of "
                     f"{', '.join(sorted(_metric_names(classifier)))}")
  import jax  # pylint: disable=g-import-not-at-top
  if at_source_size and jax.process_count() > 1:
    raise SweepError(f"{title}: --evaluate scores on one host; sweep without it, then "
                     "run the same command with --evaluate in one process")
  if at_source_size and (classifier or metric not in SOURCE_METRIC):
    raise SweepError(f"{title}: --evaluate scores segmentation runs by one of "
                     f"{', '.join(SOURCE_METRIC)}, not {metric!r}")
  # Every run's config is built and checked before the first one trains.
  planned = []
  for run in sweep["runs"]:
    where = f"{title} run {run['name']!r}"
    cfg = apply_overrides(base, {k: v for k, v in run.items() if k != "name"}, where)
    try:
      train_state.validate_config(cfg, sharding.make_mesh(cfg.mesh).size)
    except ValueError as e:
      raise SweepError(f"{where}: {e}") from None
    _check_workdir(cfg, workdir / run["name"], where)
    planned.append((run, cfg, where))
  summaries: list[dict[str, Any]] = []
  for run, cfg, where in planned:
    log.info("%s (%d of %d)", where, len(summaries) + 1, len(planned))
    summaries.append(run_one(cfg, run, workdir / run["name"], metric, where,
                             at_source_size=at_source_size))
    if _is_writer():
      workdir.mkdir(parents=True, exist_ok=True)
      _write_json(workdir / "sweep.json", {
          "metric": metric, "base": crossval.jsonable(sweep.get("base", {})),
          "overrides": crossval.jsonable(overrides or {}), "runs": summaries})
      workdir_lib.write_text_atomic(workdir / "sweep.md",
                                    render_table(summaries, metric, f"# {title}"))
  return summaries, metric


def _fold_plan(config: ml_collections.ConfigDict, workdir, num_folds: int,
               fold_ids: Sequence[int], where: str) -> list[tuple[int, Any, Any]]:
  """(fold, config, workdir) of every fold to train, each config checked."""
  from nerveseg_jax import sharding, train_state  # pylint: disable=g-import-not-at-top
  plan = []
  for k in fold_ids:
    here = f"{where} fold {k}"
    try:
      cfg = crossval.fold_config(config, num_folds, k)
      train_state.validate_config(cfg, sharding.make_mesh(cfg.mesh).size)
    except ValueError as e:
      raise SweepError(f"{here}: {e}") from None
    fold_dir = workdir / crossval.fold_name(k)
    _check_workdir(cfg, fold_dir, here)
    plan.append((k, cfg, fold_dir))
  return plan


def _cv_is_current(workdir, folds: list[dict[str, Any]]) -> dict[str, Any] | None:
  """cv.json when it scored exactly these folds at these steps (nothing to redo)."""
  if not (workdir / crossval.CV_FILE).exists():
    return None
  try:
    cv = crossval.read(workdir)
  except crossval.CrossValError:
    return None
  now = [(f["fold"], f["status"], f.get("step")) for f in folds]
  then = [(r["fold"], r["status"], r.get("step")) for r in cv["per_fold"]]
  return cv if now == then else None


def run_cv(plan: list[tuple[int, Any, Any]], workdir, num_folds: int, where: str,
           tta: bool = False) -> dict[str, Any]:
  """Trains the planned folds one after another (or reads them back), then scores them."""
  folds = []
  for k, cfg, fold_dir in plan:
    log.info("%s fold %d (%d of %d)", where, k, len(folds) + 1, len(plan))
    run = {"name": crossval.fold_name(k), "data.num_folds": num_folds, "data.fold": k}
    s = run_one(cfg, run, fold_dir, "kaggle_score", f"{where} fold {k}")
    folds.append({"fold": k, "workdir": fold_dir, "status": s["status"],
                  "wall_seconds": s.get("wall_seconds"), "steps": s.get("steps"),
                  "step": (workdir_lib.checkpoint_steps(fold_dir) or [None])[-1]})
  current = _cv_is_current(workdir, folds)
  if current is not None and current.get("tta") == tta:
    log.info("%s: scored earlier, read from %s", where, workdir / crossval.CV_FILE)
    return current
  if not _is_writer():
    return {}
  return crossval.score_folds(workdir, folds, num_folds=num_folds, tta=tta)


def run_cv_sweep(config: ml_collections.ConfigDict, sweep: dict[str, Any] | None, workdir,
                 num_folds: int, fold_ids: Sequence[int], title: str,
                 overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
  """One CV folder (SWEEP None) in WORKDIR, or one per sweep run in WORKDIR/<name>.

  Returns ({name: cv.json dict}, the markdown written to WORKDIR/cv.md or sweep.md).
  """
  from nerveseg_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise SweepError(f"{title}: --folds scores on one host; run it in one process")
  workdir = workdir_lib.as_path(workdir)
  base = apply_overrides(config, (sweep or {}).get("base", {}), f"{title} (base)")
  base = apply_overrides(base, overrides or {}, f"{title} (--config overrides)")
  if sweep is None:
    cv = run_cv(_fold_plan(base, workdir, num_folds, fold_ids, title), workdir, num_folds,
                title)
    return {workdir.name: cv}, (workdir / crossval.CV_TABLE).read_text()
  # Every run's every fold is planned and checked before the first one trains.
  plans = {}
  for run in sweep["runs"]:
    where = f"{title} run {run['name']!r}"
    cfg = apply_overrides(base, {k: v for k, v in run.items() if k != "name"}, where)
    plans[run["name"]] = _fold_plan(cfg, workdir / run["name"], num_folds, fold_ids, where)
  run_overrides = {r["name"]: crossval.jsonable({k: v for k, v in r.items() if k != "name"})
                   for r in sweep["runs"]}
  base_name = "base" if "base" in plans else sweep["runs"][0]["name"]
  cvs: dict[str, Any] = {}
  table = ""
  for name, plan in plans.items():
    cvs[name] = run_cv(plan, workdir / name, num_folds, f"{title} run {name!r}")
    if _is_writer():
      table = crossval.render_study(cvs, run_overrides, base_name, f"# {title}",
                                    noise_run=sweep.get("noise_run"))
      _write_json(workdir / "sweep.json", {
          "num_folds": num_folds, "folds": list(fold_ids), "base": crossval.jsonable(sweep["base"]),
          "overrides": crossval.jsonable(overrides or {}), "base_run": base_name,
          "noise_run": sweep.get("noise_run"),
          "runs": {n: {"overrides": run_overrides[n], "cv": c} for n, c in cvs.items()}})
      workdir_lib.write_text_atomic(workdir / "sweep.md", table)
  return cvs, table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.parser(
      "nerveseg-sweep", "Train one config under a list of overrides, one run after "
      "another, and rank them by validation (re-running resumes).",
      "examples:\n  nerveseg-sweep --config unet:folder --sweep configs/sweeps/real_subset.py "
      "\\\n      --config.data.manual_dir=~/frames --evaluate\n"
      "  nerveseg-sweep --config unet:folder,cpu --folds 5 --workdir runs/cv \\\n"
      "      --config.data.manual_dir=~/frames   # then: nerveseg-predict --workdir runs/cv ...\n"
      "  nerveseg-sweep --compare runs/cv runs/cv_longer   # two CVs, paired by fold")
  cli.add_config(p, required=False)
  cli.add_workdir(p, required=False,
                  help_text="where the runs go (default ./runs/sweep_<sweep file>)")
  p.add_argument("--sweep", default="",
                 help="configs/sweeps/<name>.py[:arg] (needed unless --folds is given)")
  p.add_argument("--folds", type=int, default=0,
                 help="K: cross-validate over a K-fold subject-wise split, into "
                      "WORKDIR/fold_<k> (with --sweep: WORKDIR/<run>/fold_<k>)")
  p.add_argument("--fold_ids", default="",
                 help="with --folds: train only these folds, e.g. 0,1 (default: all)")
  p.add_argument("--evaluate", action="store_true",
                 help="also score each run at the frames' own size with evaluate "
                      "(uncalibrated), and rank by that")
  p.add_argument("--compare", nargs="+", default=None, metavar="CV_DIR",
                 help="compare CV folders made apart, paired by fold, against the first "
                      "(trains nothing)")
  p.add_argument("--metric", default="",
                 help="validation metric to rank by (default: the sweep file's, else the "
                      "one train keeps the best checkpoint by)")
  args = cli.parse(p, argv)
  if not args.compare and not args.config_arg:
    try:
      cli.load_config("")  # the same message, and exit code, as a face whose config is required
    except cli.ConfigError as e:
      p.exit(2, f"error: {e}\n")
  return args


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.compare:
    if args.sweep or args.folds or args.config_arg or args.overrides:
      raise SweepError("--compare reads finished CV folders; it takes no --sweep, --folds "
                       "or --config")
    _, table = crossval.compare(args.compare)
    print(table)
    return 0
  if args.fold_ids and not args.folds:
    raise SweepError("--fold_ids needs --folds K")
  if not args.sweep and not args.folds:
    raise SweepError("give --sweep SWEEP_FILE, or --folds K to cross-validate the config")
  path, _, arg = args.sweep.partition(":")
  overrides = {k: get_key(args.config, k) for k, _ in args.overrides}
  if args.folds:
    if args.evaluate or args.metric:
      raise SweepError("--folds always scores at the frames' own size by nerve Dice and "
                       "Kaggle score; drop --evaluate and --metric")
    fold_ids = crossval.parse_folds(args.folds, args.fold_ids)
    default = (f"sweep_{pathlib.Path(path).stem}" if path
               else f"cv_{args.config.get('name', 'run')}")
    workdir = args.workdir or str(pathlib.Path("runs") / default)
    title = (f"sweep {args.sweep}, " if path else "cross-validation, ") + (
        f"folds {','.join(map(str, fold_ids))} of {args.folds}")
    try:
      _, table = run_cv_sweep(args.config, load_sweep(path, arg) if path else None, workdir,
                              args.folds, fold_ids, title, overrides)
    except Preempted as e:
      print(f"preempted in {e}: run the same command again to resume")
      return 143
    if _is_writer():
      print(table)
    return 0
  # A string, not pathlib: gs://bucket/sweep must keep its double slash.
  workdir = args.workdir or str(pathlib.Path("runs") / f"sweep_{pathlib.Path(path).stem}")
  try:
    sweep = load_sweep(path, arg)
    summaries, metric = run_sweep(args.config, sweep, workdir, args.metric or None,
                                  title=f"sweep {args.sweep}", overrides=overrides,
                                  at_source_size=args.evaluate)
  except Preempted as e:
    print(f"preempted in {e}: run the same command again to resume the sweep")
    return 143  # 128 + SIGTERM, as train does, for requeueing
  if _is_writer():
    print(render_table(summaries, metric, f"# sweep {args.sweep}"))
  return 0


def run() -> None:
  """Console-script entry (`nerveseg-sweep`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
