"""workdir: the atomic writer, config.json and its history, val_history.jsonl."""

import errno
import json
import os

import pytest

from nerveseg_jax import workdir
from nerveseg_jax.configs import unet


def _saved(path):
  """config.json as a plain dict (JSON has no tuples: compared as JSON)."""
  return workdir.config_to_dict(workdir.read_config(path))


def test_write_text_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "record.json"
  workdir.write_text_atomic(path, "first\n")
  workdir.write_text_atomic(path, "second\r\n")         # written as given, CSV-style too
  assert path.read_bytes() == b"second\r\n"
  assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
  path = tmp_path / "record.json"
  workdir.write_text_atomic(path, "old\n")

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match="No space left") as e:
    workdir.write_text_atomic(path, "new\n")
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
  monkeypatch.undo()
  assert path.read_text() == "old\n"
  assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
  old = os.umask(0o022)
  try:
    workdir.write_text_atomic(tmp_path / "r.json", "{}")
  finally:
    os.umask(old)
  assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_config_round_trip_and_missing_workdir(tmp_path):
  config = unet.get_config("smoke")
  workdir.write_config(tmp_path, config)
  assert _saved(tmp_path) == workdir.config_to_dict(config)
  assert workdir.config_to_dict(config) == json.loads((tmp_path / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="config.json.*training workdir"):
    workdir.read_config(tmp_path / "nope")


def test_record_config_keeps_each_replaced_config_with_its_steps(tmp_path):
  a = unet.get_config("smoke")
  workdir.record_config(tmp_path, a, resumed_from=0)      # a fresh run's first save
  assert _saved(tmp_path) == workdir.config_to_dict(a)
  workdir.record_config(tmp_path, a, resumed_from=10)     # the same config: nothing to add
  assert workdir.read_config_history(tmp_path) == []
  b = unet.get_config("smoke")
  b.learning_rate = 1e-4
  workdir.record_config(tmp_path, b, resumed_from=10)
  c = unet.get_config("smoke")
  c.num_train_steps = 99
  workdir.record_config(tmp_path, c, resumed_from=25)
  assert _saved(tmp_path) == workdir.config_to_dict(c)
  assert workdir.read_config_history(tmp_path) == [
      {"from_step": 0, "to_step": 10, "config": workdir.config_to_dict(a)},
      {"from_step": 10, "to_step": 25, "config": workdir.config_to_dict(b)}]


def test_record_config_replaces_a_config_json_that_trained_nothing(tmp_path):
  # Left by a run that never saved (or an older version that wrote it at every start).
  stale = unet.get_config("smoke")
  stale.model.features = 64
  workdir.write_config(tmp_path, stale)
  config = unet.get_config("smoke")
  workdir.record_config(tmp_path, config, resumed_from=0)
  assert _saved(tmp_path) == workdir.config_to_dict(config)
  assert not (tmp_path / workdir.CONFIG_HISTORY_FILE).exists()


def test_val_history_last_line_of_a_step_wins_and_nan_is_null(tmp_path):
  workdir.append_val_history(tmp_path, 4, {"loss": 1.0, "kaggle_score": float("nan")})
  workdir.append_val_history(tmp_path, 2, {"loss": 2.0})
  workdir.append_val_history(tmp_path, 4, {"loss": 0.5})   # evaluated again after a resume
  assert workdir.read_val_history(tmp_path) == [{"step": 2, "loss": 2.0},
                                                {"step": 4, "loss": 0.5}]
  first = (tmp_path / workdir.VAL_HISTORY_FILE).read_text().splitlines()[0]
  assert json.loads(first)["kaggle_score"] is None
  assert workdir.read_val_history(tmp_path / "none") == []


def test_a_damaged_history_line_names_the_file_and_line(tmp_path):
  (tmp_path / workdir.VAL_HISTORY_FILE).write_text('{"step": 2}\n{"step": 4, "lo\n')
  with pytest.raises(ValueError, match=r"val_history.jsonl line 2: not JSON"):
    workdir.read_val_history(tmp_path)


def test_checkpoint_steps_are_committed_step_directories_only(tmp_path):
  assert workdir.checkpoint_steps(tmp_path) == []
  for name in ("2", "10", "12.orbax-checkpoint-tmp-3"):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  assert workdir.checkpoint_steps(tmp_path) == [2, 10]
