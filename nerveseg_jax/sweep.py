"""Hyper-parameter sweeps: one config trained under a list of overrides, then tabulated.

  python -m nerveseg_jax.sweep --config configs/unet.py:folder \\
      --sweep configs/sweeps/real_subset.py [--workdir runs/sweep_real_subset] \\
      [--config.KEY=VALUE ...]        # applies to every run of the sweep

A sweep file has ``get_sweep(arg) -> {"base": {key: value}, "runs": [{"name": ..., key:
value}, ...], "metric": optional}`` with dotted config keys (``data.image_size``, ``loss.dice``). Each run
trains with ``train.train_and_evaluate`` in WORKDIR/<name>, one after another, and the
table WORKDIR/sweep.md (and sweep.json) is rewritten after every run, so an interrupted
sweep loses nothing: run the same command again and finished runs are read back from
their result file, a preempted one resumes from its checkpoint.

Runs are ranked by the validation metric (``--metric``, else the sweep file's, else the
one train.py keeps the best checkpoint by) at the last step, with the best value over the evals shown too.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any

import ml_collections

RESULT_FILE = "sweep_result.json"
PARTIAL_FILE = "sweep_partial.json"  # evals of a run that was preempted, for its resume


def _is_writer() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


class SweepError(ValueError):
  """A sweep file or one of its runs is malformed (names the file, run and key)."""


def load_sweep(path: str | pathlib.Path, arg: str = "") -> dict[str, Any]:
  """Imports SWEEP_FILE[:arg] and checks its shape."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise SweepError(f"sweep file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"sweep file {path} has no get_sweep(arg) function")
  sweep = module.get_sweep(arg)
  if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list):
    raise SweepError(f"{path}: get_sweep must return {{'base': {{...}}, 'runs': [...]}}")
  names = [r.get("name") if isinstance(r, dict) else None for r in sweep["runs"]]
  for i, name in enumerate(names):
    if not isinstance(name, str) or not name or "/" in name:
      raise SweepError(f"{path}: run {i} needs a 'name' (a folder name, no '/')")
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f"{path}: run names must be unique; repeated: {', '.join(dupes)}")
  sweep.setdefault("base", {})
  return sweep


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                    where: str) -> ml_collections.ConfigDict:
  """A copy of CONFIG with dotted-key OVERRIDES set; an unknown key is an error naming it."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    if key == "name":
      continue
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
      setattr(node, leaf, value)  # ConfigDict keeps each key's type: 1e-3 into an int fails
    except TypeError as e:
      raise SweepError(f"{where}: config key {key!r}: {e}") from None
  return config


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None  # NaN (e.g. no nerve frame in a fold) as JSON null
  if hasattr(x, "item"):
    return _jsonable(x.item())
  return x


def run_one(config: ml_collections.ConfigDict, run: dict[str, Any], workdir: pathlib.Path,
            metric: str) -> dict[str, Any]:
  """Trains one run (or reads back its finished result) and returns its summary."""
  from nerveseg_jax import train  # pylint: disable=g-import-not-at-top
  overrides = {k: v for k, v in run.items() if k != "name"}
  result_path = workdir / RESULT_FILE
  if result_path.exists():
    done = json.loads(result_path.read_text())
    if done.get("overrides") == _jsonable(overrides) and done.get("status") in ("ok",
                                                                                "diverged"):
      logging.info("sweep run %s: finished earlier, read from %s", run["name"], result_path)
      return done
  t0 = time.perf_counter()
  summary: dict[str, Any] = {"name": run["name"], "overrides": _jsonable(overrides)}
  try:
    result = train.train_and_evaluate(config, workdir)
  except train.NonFiniteLossError as e:
    # A diverging setting is a result of the sweep, not a reason to stop it.
    summary.update(status="diverged", error=str(e), wall_seconds=time.perf_counter() - t0)
  else:
    partial_path = workdir / PARTIAL_FILE
    earlier = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    # A resumed run returns only the evals after its restart: keep the earlier ones.
    history = [h for h in earlier.get("val_history", [])
               if h["step"] < min([r["step"] for r in result.get("val_history", [])],
                                  default=math.inf)] + list(result.get("val_history", []))
    wall = earlier.get("wall_seconds", 0.0) + time.perf_counter() - t0
    if result.get("preempted"):
      if _is_writer():
        workdir.mkdir(parents=True, exist_ok=True)
        partial_path.write_text(json.dumps(_jsonable(
            {"val_history": history, "wall_seconds": wall}), indent=2) + "\n")
      summary["status"] = "preempted"
      return summary
    values = [h.get(metric) for h in history if h.get(metric) is not None]
    finite = [v for v in values if math.isfinite(v)]
    summary.update(
        status="ok", steps=int(result["step"]), wall_seconds=wall,
        final=values[-1] if values else None, best=max(finite) if finite else None,
        best_step=(history[[h.get(metric) for h in history].index(max(finite))]["step"]
                   if finite else None),
        val_history=history,
        train_loss=result.get("train_loss"))
    if not history:
      summary["status"] = "no_validation"
  summary = _jsonable(summary)
  if _is_writer():
    workdir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4f}"
  return str(v)


def render_table(summaries: list[dict[str, Any]], metric: str, header: str) -> str:
  """A markdown table ranked by the final value of METRIC (best first)."""
  steps = sorted({h["step"] for s in summaries for h in s.get("val_history", [])})
  ranked = sorted(summaries, key=lambda s: -(s.get("final") if s.get("final") is not None
                                             else -math.inf))
  cols = ["rank", "run", "overrides", *[f"step {st}" for st in steps], "best (step)",
          "wall s", "status"]
  lines = [header, "", f"Ranked by validation `{metric}` at the last step.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for i, s in enumerate(ranked, 1):
    by_step = {h["step"]: h.get(metric) for h in s.get("val_history", [])}
    overrides = ", ".join(f"`{k}={v}`" for k, v in s["overrides"].items()) or "(base)"
    best = (f"{_fmt(s.get('best'))} ({s.get('best_step')})" if s.get("best") is not None
            else "-")
    wall = s.get("wall_seconds")
    lines.append("| " + " | ".join([
        str(i), s["name"], overrides, *[_fmt(by_step.get(st)) for st in steps], best,
        f"{wall:.0f}" if wall is not None else "-", s.get("status", "?")]) + " |")
  return "\n".join(lines) + "\n"


def run_sweep(config: ml_collections.ConfigDict, sweep: dict[str, Any],
              workdir: str | pathlib.Path, metric: str | None = None,
              title: str = "sweep") -> list[dict[str, Any]]:
  """Trains every run of SWEEP in WORKDIR/<name>; writes sweep.json and sweep.md."""
  import jax  # pylint: disable=g-import-not-at-top
  from nerveseg_jax import train  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  base = apply_overrides(config, sweep.get("base", {}), f"{title} (base)")
  # Every run's config is built (and so checked) before the first one trains.
  configs = [(run, apply_overrides(base, run, f"{title} run {run['name']!r}"))
             for run in sweep["runs"]]
  metric = metric or sweep.get("metric")
  if metric is None:
    classifier = str(base.model.name) in train.CLASSIFIER_MODELS
    metric = "presence_accuracy" if classifier else "kaggle_score"
  summaries: list[dict[str, Any]] = []
  for run, cfg in configs:
    logging.info("%s: run %s (%d of %d)", title, run["name"], len(summaries) + 1,
                 len(configs))
    summary = run_one(cfg, run, workdir / run["name"], metric)
    if summary.get("status") == "preempted":
      raise _Preempted(workdir / run["name"])
    summaries.append(summary)
    if jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "sweep.json").write_text(json.dumps(
          {"metric": metric, "base": _jsonable(sweep.get("base", {})), "runs": summaries},
          indent=2) + "\n")
      (workdir / "sweep.md").write_text(render_table(summaries, metric, f"# {title}"))
  return summaries


class _Preempted(Exception):
  pass


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
  fl = flags.FLAGS
  path, _, arg = fl.sweep.partition(":")
  workdir = fl.workdir or (pathlib.Path("runs") / f"sweep_{pathlib.Path(path).stem}")
  try:
    sweep = load_sweep(path, arg)
    summaries = run_sweep(fl.config, sweep, workdir, fl.metric or None,
                          title=f"sweep {fl.sweep}")
  except _Preempted as e:
    print(f"preempted in {e}: run the same command again to resume the sweep")
    raise SystemExit(143) from None
  except (SweepError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  print((pathlib.Path(workdir) / "sweep.md").read_text() if summaries else "no runs")


def run() -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from nerveseg_jax import train  # pylint: disable=g-import-not-at-top
  train._flags()  # pylint: disable=protected-access  # --config (with overrides), --workdir
  flags.DEFINE_string("sweep", None, "configs/sweeps/<name>.py[:arg]", required=True)
  flags.DEFINE_string("metric", "", "validation metric to rank by (default: train's best)")
  logging.getLogger().setLevel(logging.INFO)
  app.run(main, flags_parser=train._friendly_flag_errors)  # pylint: disable=protected-access


if __name__ == "__main__":
  run()
