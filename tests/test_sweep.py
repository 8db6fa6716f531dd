"""nerveseg_jax.sweep: runs under overrides, the ranked table, resume, and bad sweep files."""

import json
import subprocess
import sys

import pytest

from nerveseg_jax import sweep
from nerveseg_jax import train
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
  got = sweep.run_sweep(smoke_config(data_dir), spec, tmp_path, title="t")
  assert [s["name"] for s in got] == ["base", "lr_low"]
  for s in got:
    assert s["status"] == "ok" and s["steps"] == 4
    assert [h["step"] for h in s["val_history"]] == [2, 4]
    assert s["final"] == s["val_history"][-1]["nerve_dice"]
    assert s["best"] == max(h["nerve_dice"] for h in s["val_history"])
  # Each run trained with its own override on top of the base.
  cfg = json.loads((tmp_path / "lr_low" / "config.json").read_text())
  assert cfg["learning_rate"] == 1e-4 and cfg["num_train_steps"] == 4
  assert json.loads((tmp_path / "base" / "config.json").read_text())["learning_rate"] == 3e-3

  table = (tmp_path / "sweep.md").read_text()
  assert "step 2" in table and "step 4" in table and "`learning_rate=0.0001`" in table
  rows = [l for l in table.splitlines() if l.startswith("| 1 ") or l.startswith("| 2 ")]
  ranked = sorted(got, key=lambda s: -s["final"])
  assert [r.split("|")[2].strip() for r in rows] == [s["name"] for s in ranked]
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert saved["metric"] == "nerve_dice" and len(saved["runs"]) == 2

  # Run again: finished runs are read back from their result file, nothing trains.
  def no_training(*a, **k):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  again = sweep.run_sweep(smoke_config(data_dir), spec, tmp_path, title="t")
  assert [s["final"] for s in again] == [s["final"] for s in got]


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
  calls = []

  def fake(config, workdir):
    calls.append(float(config.learning_rate))
    if config.learning_rate > 1:
      raise train.NonFiniteLossError("non-finite loss nan at step 3")
    return {"step": 4, "preempted": False,
            "val_history": [{"step": 4, "kaggle_score": 0.5}]}

  monkeypatch.setattr(train, "train_and_evaluate", fake)
  spec = {"runs": [{"name": "huge", "learning_rate": 10.0}, {"name": "ok"}]}
  got = sweep.run_sweep(unet.get_config("smoke"), spec, tmp_path)
  assert calls == [10.0, 3e-3]
  assert got[0]["status"] == "diverged" and "step 3" in got[0]["error"]
  assert got[1]["status"] == "ok" and got[1]["final"] == 0.5
  table = (tmp_path / "sweep.md").read_text()
  # Ranked by the metric: the diverged run comes last.
  assert table.index("| ok |") < table.index("| huge |") and "diverged" in table


def test_preemption_stops_the_sweep_and_the_rerun_keeps_its_evals(tmp_path, monkeypatch):
  results = iter([
      {"step": 3, "preempted": True, "val_history": [{"step": 2, "kaggle_score": 0.25}]},
      {"step": 4, "preempted": False, "val_history": [{"step": 4, "kaggle_score": 0.5}]},
      {"step": 4, "preempted": False, "val_history": [{"step": 4, "kaggle_score": 0.75}]},
  ])
  monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: next(results))
  spec = {"runs": [{"name": "a"}, {"name": "b"}]}
  with pytest.raises(sweep._Preempted):  # pylint: disable=protected-access
    sweep.run_sweep(unet.get_config("smoke"), spec, tmp_path)
  # Nothing recorded as finished: the next run of the command resumes run a ...
  assert not (tmp_path / "a" / sweep.RESULT_FILE).exists()
  got = sweep.run_sweep(unet.get_config("smoke"), spec, tmp_path)
  # ... and its table row has the evals from before the preemption too.
  assert [h["step"] for h in got[0]["val_history"]] == [2, 4]
  assert got[0]["best"] == 0.5 and got[1]["final"] == 0.75


def test_bad_keys_fail_before_anything_trains(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda *a: pytest.fail("trained despite a bad sweep"))
  cfg = unet.get_config("smoke")
  spec = {"runs": [{"name": "fine"}, {"name": "typo", "model.featurs": 8}]}
  with pytest.raises(sweep.SweepError, match=r"run 'typo'.*unknown config key 'model.featurs'"):
    sweep.run_sweep(cfg, spec, tmp_path)
  with pytest.raises(sweep.SweepError, match=r"\(base\).*unknown config key 'nope'"):
    sweep.run_sweep(cfg, {"base": {"nope": 1}, "runs": [{"name": "a"}]}, tmp_path)
  with pytest.raises(sweep.SweepError, match=r"run 'a'.*'num_train_steps'"):
    sweep.run_sweep(cfg, {"runs": [{"name": "a", "num_train_steps": 0.5}]}, tmp_path)
  assert not any(tmp_path.iterdir())


def test_sweep_file_checks(tmp_path):
  with pytest.raises(sweep.SweepError, match="does not exist"):
    sweep.load_sweep(tmp_path / "missing.py")
  f = tmp_path / "s.py"
  f.write_text("def get_sweep(arg):\n  return {'runs': [{'name': 'a'}, {'name': 'a'}]}\n")
  with pytest.raises(sweep.SweepError, match="unique; repeated: a"):
    sweep.load_sweep(f)
  f.write_text("def get_sweep(arg):\n  return {'runs': [{'lr': 1}]}\n")
  with pytest.raises(sweep.SweepError, match="run 0 needs a 'name'"):
    sweep.load_sweep(f)
  f.write_text("X = 1\n")
  with pytest.raises(sweep.SweepError, match="no get_sweep"):
    sweep.load_sweep(f)


def test_the_shipped_real_subset_sweep_applies_to_the_folder_config():
  spec = sweep.load_sweep(REPO / "configs" / "sweeps" / "real_subset.py")
  base = sweep.apply_overrides(unet.get_config("folder"), spec["base"], "base")
  names = [r["name"] for r in spec["runs"]]
  assert names[0] == "base" and "seed1" in names
  for run in spec["runs"]:
    cfg = sweep.apply_overrides(base, run, run["name"])
    changed = {k for k in run if k != "name"}
    # One factor at a time (the schedule's warmup moves with its length).
    assert len(changed - {"warmup_steps"}) <= 1, run
    assert cfg.data.source == "folder"


def test_cli_names_a_bad_sweep_key(data_dir, tmp_path):
  f = tmp_path / "s.py"
  f.write_text("def get_sweep(arg):\n  return {'runs': [{'name': 'a', 'loss.dyce': 1.0}]}\n")
  proc = subprocess.run(
      [sys.executable, "-m", "nerveseg_jax.sweep", "--config",
       str(REPO / "configs" / "unet.py") + ":smoke", f"--sweep={f}",
       f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={data_dir}"],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode != 0
  assert "unknown config key 'loss.dyce'" in proc.stderr and "run 'a'" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()
