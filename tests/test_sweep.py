"""nerveseg_jax.sweep: runs under overrides, the ranked table, resume, and bad sweep files."""

import json
import subprocess
import sys

import pytest

from nerveseg_jax import sweep
from nerveseg_jax import train, train_state, trainer
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.configs import unet
from test_train import REPO, smoke_config, smoke_data_dir

BASE = {"num_train_steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 4,
        "log_every_steps": 2, "warmup_steps": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return smoke_data_dir(tmp_path_factory)


def test_sweep_trains_each_run_tabulates_and_reads_back(data_dir, tmp_path, monkeypatch):
  spec = {"base": BASE, "metric": "nerve_dice",
          "runs": [{"name": "base"}, {"name": "lr_low", "learning_rate": 1e-4}]}
  got, metric = sweep.run_sweep(smoke_config(data_dir), spec, tmp_path, title="t",
                                overrides={"log_every_steps": 4})
  assert metric == "nerve_dice" and [s["name"] for s in got] == ["base", "lr_low"]
  for s in got:
    assert s["status"] == "ok" and s["steps"] == 4
    # Read from the run's val_history.jsonl, which train writes at every evaluation.
    assert [h["step"] for h in s["val_history"]] == [2, 4]
    assert s["val_history"] == workdir_lib.read_val_history(tmp_path / s["name"])
    assert s["final"] == s["val_history"][-1]["nerve_dice"]
    assert s["best"] == max(h["nerve_dice"] for h in s["val_history"])
  # Each run trained with its own key on top of the base, and the command line's
  # overrides come after the base.
  cfg = json.loads((tmp_path / "lr_low" / "config.json").read_text())
  assert cfg["learning_rate"] == 1e-4 and cfg["num_train_steps"] == 4
  assert cfg["log_every_steps"] == 4
  assert json.loads((tmp_path / "base" / "config.json").read_text())["learning_rate"] == 3e-3

  table = (tmp_path / "sweep.md").read_text()
  assert "step 2" in table and "step 4" in table and "`learning_rate=0.0001`" in table
  assert "| base | (base) |" in table
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert saved["metric"] == "nerve_dice" and len(saved["runs"]) == 2

  # Run again: finished runs are read back from their result file, nothing trains, and
  # they are scored by the metric asked for now.
  def no_training(*a, **k):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(trainer, "train_and_evaluate", no_training)
  again, _ = sweep.run_sweep(smoke_config(data_dir), spec, tmp_path, title="t",
                             overrides={"log_every_steps": 4})
  assert [s["final"] for s in again] == [s["final"] for s in got]
  by_loss, _ = sweep.run_sweep(smoke_config(data_dir), spec, tmp_path, metric="loss",
                               overrides={"log_every_steps": 4})
  assert [s["final"] for s in by_loss] == [s["val_history"][-1]["loss"] for s in got]
  assert by_loss[0]["best"] == min(h["loss"] for h in got[0]["val_history"])
  # --evaluate: each finished run scored once by `evaluate` at the frames' own size.
  scored, _ = sweep.run_sweep(smoke_config(data_dir), spec, tmp_path, at_source_size=True,
                              overrides={"log_every_steps": 4})
  from nerveseg_jax import evaluate  # pylint: disable=g-import-not-at-top
  for s in scored:
    m = json.loads((tmp_path / s["name"] / "eval" / "metrics.json").read_text())["metrics"]
    assert s["source_final"] == pytest.approx(m["dice_nerve_frames"])
    assert 0.0 <= s["source_size"]["kaggle_score"] <= 1.0
  table = (tmp_path / "sweep.md").read_text()
  assert "at source size" in table and "`dice_nerve_frames`, uncalibrated" in table
  monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("scored twice"))
  again, _ = sweep.run_sweep(smoke_config(data_dir), spec, tmp_path, at_source_size=True,
                             overrides={"log_every_steps": 4})
  assert [s["source_final"] for s in again] == [s["source_final"] for s in scored]
  assert [s["name"] for s in sweep.rank(again, "nerve_dice")] == [
      s["name"] for s in sorted(scored, key=lambda s: -s["source_final"])]
  # A changed config for a run that has a workdir is an error naming the keys.
  changed = {**spec, "base": {**BASE, "weight_decay": 0.5}}
  with pytest.raises(sweep.SweepError, match=r"run 'base'.*another config.*weight_decay"):
    sweep.run_sweep(smoke_config(data_dir), changed, tmp_path,
                    overrides={"log_every_steps": 4})


def _fake_train(finals, raises=()):
  """A train_and_evaluate that writes one evaluation per run, as the real one does."""
  def fake(config, workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    lr = float(config.learning_rate)
    if lr in raises:
      raise train.NonFiniteLossError("non-finite loss nan at step 3")
    value = finals[lr]
    if value is not None:
      workdir_lib.append_val_history(workdir, 2, {"kaggle_score": 0.1, "loss": 2.0})
      workdir_lib.append_val_history(workdir, 4, {"kaggle_score": value, "loss": 1.0 - value})
    return {"step": 4, "preempted": False}
  return fake


def test_ranking_handles_nan_missing_and_diverged_runs(tmp_path, monkeypatch):
  finals = {1e-3: 0.2, 2e-3: float("nan"), 3e-3: 0.9, 4e-3: None}
  monkeypatch.setattr(trainer, "train_and_evaluate", _fake_train(finals, raises=(5e-3,)))
  spec = {"runs": [{"name": "a", "learning_rate": 1e-3}, {"name": "nan", "learning_rate": 2e-3},
                   {"name": "c", "learning_rate": 3e-3}, {"name": "none", "learning_rate": 4e-3},
                   {"name": "huge", "learning_rate": 5e-3}]}
  got, metric = sweep.run_sweep(unet.get_config("smoke"), spec, tmp_path)
  assert metric == "kaggle_score"
  status = {s["name"]: s["status"] for s in got}
  assert status == {"a": "ok", "nan": "ok", "c": "ok", "none": "no_validation",
                    "huge": "diverged"}
  assert [s["name"] for s in sweep.rank(got, metric)][:2] == ["c", "a"]
  table = (tmp_path / "sweep.md").read_text()
  rows = [l.split("|")[2].strip() for l in table.splitlines() if l.startswith("| ")][1:]
  assert rows[:2] == ["c", "a"] and set(rows[2:]) == {"nan", "none", "huge"}
  assert "step 3" in got[-1]["error"]
  # The best of the NaN run is its finite step-2 value; the diverged run has none.
  assert got[1]["final"] is None and got[1]["best"] == 0.1 and got[1]["best_step"] == 2
  # Lower is better for the loss.
  ranked = sweep.rank([dict(s, **sweep.score(s["val_history"], "loss")) for s in got], "loss")
  assert [s["name"] for s in ranked][:2] == ["c", "a"]


def test_preemption_stops_the_sweep_and_the_rerun_resumes(tmp_path, monkeypatch):
  calls = []

  def fake(config, workdir):
    calls.append(workdir.name)
    workdir.mkdir(parents=True, exist_ok=True)
    if len(calls) == 1:   # run a: one evaluation, then SIGTERM
      workdir_lib.append_val_history(workdir, 2, {"kaggle_score": 0.25})
      return {"step": 3, "preempted": True}
    workdir_lib.append_val_history(workdir, 4, {"kaggle_score": 0.5 + 0.25 * (len(calls) == 3)})
    return {"step": 4, "preempted": False}

  monkeypatch.setattr(trainer, "train_and_evaluate", fake)
  spec = {"runs": [{"name": "a"}, {"name": "b"}]}
  with pytest.raises(sweep.Preempted):
    sweep.run_sweep(unet.get_config("smoke"), spec, tmp_path)
  # Nothing recorded as finished: the next run of the command resumes run a ...
  assert not (tmp_path / "a" / sweep.RESULT_FILE).exists()
  got, _ = sweep.run_sweep(unet.get_config("smoke"), spec, tmp_path)
  assert calls == ["a", "a", "b"]
  # ... and its row has the evaluation from before the preemption too.
  assert [h["step"] for h in got[0]["val_history"]] == [2, 4]
  assert got[0]["final"] == 0.5 and got[0]["best_step"] == 4 and got[1]["final"] == 0.75


def test_bad_keys_and_metrics_fail_before_anything_trains(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer, "train_and_evaluate",
                      lambda *a: pytest.fail("trained despite a bad sweep"))
  cfg = unet.get_config("smoke")
  spec = {"runs": [{"name": "fine"}, {"name": "typo", "model.featurs": 8}]}
  with pytest.raises(sweep.SweepError, match=r"run 'typo'.*unknown config key 'model.featurs'"):
    sweep.run_sweep(cfg, spec, tmp_path)
  with pytest.raises(sweep.SweepError, match=r"\(base\).*unknown config key 'nope'"):
    sweep.run_sweep(cfg, {"base": {"nope": 1}, "runs": [{"name": "a"}]}, tmp_path)
  with pytest.raises(sweep.SweepError, match=r"run 'a'.*'num_train_steps'"):
    sweep.run_sweep(cfg, {"runs": [{"name": "a", "num_train_steps": 0.5}]}, tmp_path)
  # train's own config checks, for every run, before the first trains.
  with pytest.raises(sweep.SweepError, match=r"run 'b'.*batch_size"):
    sweep.run_sweep(cfg, {"runs": [{"name": "a"}, {"name": "b", "batch_size": 3}]}, tmp_path)
  with pytest.raises(sweep.SweepError, match=r"unknown metric 'nerve_dic'.*nerve_dice"):
    sweep.run_sweep(cfg, {"runs": [{"name": "a"}]}, tmp_path, metric="nerve_dic")
  with pytest.raises(sweep.SweepError, match=r"--evaluate scores.*not 'loss'"):
    sweep.run_sweep(cfg, {"runs": [{"name": "a"}]}, tmp_path, metric="loss",
                    at_source_size=True)
  assert not any(tmp_path.iterdir())


def test_sweep_file_checks(tmp_path):
  with pytest.raises(sweep.SweepError, match="does not exist"):
    sweep.load_sweep(tmp_path / "missing.py")
  f = tmp_path / "s.py"
  f.write_text("def get_sweep(arg):\n  return {'runs': [{'name': 'a'}, {'name': 'a'}]}\n")
  with pytest.raises(sweep.SweepError, match="unique; repeated: a"):
    sweep.load_sweep(f)
  for bad in ("{'lr': 1}", "{'name': '..'}", "{'name': 'sweep.md'}", "{'name': 'a/b'}"):
    f.write_text(f"def get_sweep(arg):\n  return {{'runs': [{bad}]}}\n")
    with pytest.raises(sweep.SweepError, match="run 0 needs a 'name'"):
      sweep.load_sweep(f)
  f.write_text("def get_sweep(arg):\n  return {'base': [], 'runs': []}\n")
  with pytest.raises(sweep.SweepError, match="must return"):
    sweep.load_sweep(f)
  f.write_text("X = 1\n")
  with pytest.raises(sweep.SweepError, match="no get_sweep"):
    sweep.load_sweep(f)


def test_the_shipped_real_subset_sweep_applies_to_the_folder_config():
  spec = sweep.load_sweep(REPO / "configs" / "sweeps" / "real_subset.py")
  base = sweep.apply_overrides(unet.get_config("folder"), spec["base"], "base")
  names = [r["name"] for r in spec["runs"]]
  assert names[0] == "base" and "seed1" in names and spec["metric"] == "nerve_dice"
  for run in spec["runs"]:
    cfg = sweep.apply_overrides(base, {k: v for k, v in run.items() if k != "name"}, "r")
    train_state.validate_config(cfg, 1)
    assert len([k for k in run if k != "name"]) <= 1, run   # one factor at a time
    assert cfg.data.source == "folder"


def test_cli_names_bad_sweep_keys_and_missing_flags(data_dir, tmp_path):
  f = tmp_path / "s.py"
  f.write_text("def get_sweep(arg):\n  return {'runs': [{'name': 'a', 'loss.dyce': 1.0}]}\n")
  cmd = [sys.executable, "-m", "nerveseg_jax.sweep"]
  config = ["--config", str(REPO / "configs" / "unet.py") + ":smoke"]
  for args, message in (
      (config + [f"--sweep={f}", f"--workdir={tmp_path / 'w'}",
                 f"--config.data.data_dir={data_dir}"],
       "unknown config key 'loss.dyce'"),
      (config + [f"--workdir={tmp_path / 'w'}"], "--sweep"),
      ([f"--sweep={f}", f"--workdir={tmp_path / 'w'}"], "--config"),
      (config + [f"--sweep={f}", "--config.model.featurs=2"], "unknown config key 'model.featurs'"),
  ):
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0, args
    assert message in proc.stderr, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()
