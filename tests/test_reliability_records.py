"""What the project writes stays true: predict never mixes runs, config.json describes
the checkpoints, write failures are one honest line, and every record is written whole.

Training cases resume one tiny run (configs/unet.py:smoke, 4 steps) built once here;
the rest call the functions directly with a stand-in predictor or train.
"""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nerveseg_jax import imageio, inference, postprocess, predict, sweep, train
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.configs import unet
from test_train import REPO, SUBPROCESS_ENV, smoke_config, smoke_data_dir

STEPS = 4


# ------------------------------------------------------------------ predict


class _FakePredictor:
  """Stands in for inference.Predictor: a fixed square mask on every frame."""
  batch_size = 2
  calibration = postprocess.Calibration()

  def describe(self):
    return "fake predictor"

  predict_each = inference.Predictor.predict_each  # the real fallback, over this predict

  def predict(self, frames, names):
    out = []
    for frame, name in zip(frames, names):
      mask = np.zeros(frame.shape, np.uint8)
      mask[2:6, 3:9] = 1
      out.append(inference.FramePrediction(name=name, mask=mask, presence=0.9, decision=True,
                                           area=int(mask.sum()), bbox=(3, 2, 9, 6)))
    return out


def _images(root, names=("1", "2")):
  images = root / "images"
  for n in names:
    imageio.write_png(images / f"{n}.png", np.full((12, 16), 100, np.uint8))
  return images


def _predict(monkeypatch, images, out, *extra):
  monkeypatch.setattr(inference, "Predictor", lambda *a, **k: _FakePredictor())
  return predict.main(["--workdir", "unused", "--images", str(images), "--output", str(out),
                       *extra])


def test_predict_refuses_an_output_folder_with_results(tmp_path, monkeypatch, capsys):
  images = _images(tmp_path)
  out = tmp_path / "out"
  assert _predict(monkeypatch, images, out) == 0
  # An earlier run's mask that this run would not write (its frame is gone now).
  imageio.write_png(out / "masks" / "x.png", np.zeros((12, 16), np.uint8))
  before = sorted(p.relative_to(out) for p in out.rglob("*"))
  summary = (out / "summary.json").read_text()
  capsys.readouterr()
  assert _predict(monkeypatch, images, out) == 2
  err = capsys.readouterr().err
  assert str(out) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
  # Refused before anything was written: the folder is exactly as it was.
  assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
  assert (out / "summary.json").read_text() == summary


def test_overwrite_replaces_exactly_what_predict_writes(tmp_path, monkeypatch):
  images = _images(tmp_path, names=("1", "2"))
  out = tmp_path / "out"
  assert _predict(monkeypatch, images, out) == 0
  imageio.write_png(out / "masks" / "x.png", np.zeros((12, 16), np.uint8))    # stale
  imageio.write_png(out / "overlays" / "x.png", np.zeros((12, 16), np.uint8))
  (out / "notes.txt").write_text("the user's own file")
  (out / "mine").mkdir()
  (out / "mine" / "keep.png").write_bytes(b"user data")
  # report.html as a link to a file of the user's: the link goes, the file stays.
  (out / "report.html").unlink()
  (tmp_path / "elsewhere.html").write_text("not predict's")
  (out / "report.html").symlink_to(tmp_path / "elsewhere.html")
  (images / "2.png").unlink()
  assert _predict(monkeypatch, images, out, "--overwrite") == 0
  summary = json.loads((out / "summary.json").read_text())
  assert [f["name"] for f in summary["frames"]] == ["1"]
  # The masks and overlays are exactly the frames of this run's summary.
  assert sorted(p.name for p in (out / "masks").iterdir()) == ["1.png"]
  assert sorted(p.name for p in (out / "overlays").iterdir()) == ["1.png"]
  assert [l.split(",")[0] for l in (out / "submission.csv").read_text().splitlines()] == \
      ["img", "1"]
  assert not (out / "report.html").is_symlink() and "<html" in (out / "report.html").read_text()
  # Everything else is the user's and is kept.
  assert (out / "notes.txt").read_text() == "the user's own file"
  assert (out / "mine" / "keep.png").read_bytes() == b"user data"
  assert (tmp_path / "elsewhere.html").read_text() == "not predict's"


# ------------------------------------------------------------------ training runs


def _poison_from(step):
  """A TrainIterator whose batches from data step STEP on are NaN (the loss goes non-finite)."""
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  real = pipeline.TrainIterator

  class Poisoned(real):
    def __next__(self):
      at = self.step
      batch = super().__next__()
      return dict(batch, image=batch["image"] * np.float32("nan")) if at >= step else batch

  return Poisoned


def _config(data_dir, **overrides):
  # Every run here compiles the same programs (num_train_steps fixed) except where a test
  # changes the learning rate; the persistent cache of test_train makes repeats cheap.
  return smoke_config(data_dir, num_train_steps=STEPS, eval_every_steps=2,
                      checkpoint_every_steps=2, log_every_steps=1, **overrides)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """(data_dir, workdir) of a run that saved step 2 and then went non-finite at step 3:
  checkpoints/2, config.json and one line of val_history.jsonl."""
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir = smoke_data_dir(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("base") / "run"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "TrainIterator", _poison_from(2))
    with pytest.raises(train.NonFiniteLossError):
      train.train_and_evaluate(_config(data_dir), workdir)
  assert workdir_lib.checkpoint_steps(workdir) == [2]
  return data_dir, workdir


def _copy(base_run, tmp_path):
  data_dir, workdir = base_run
  shutil.copytree(workdir, tmp_path / "run")
  return data_dir, tmp_path / "run"


def _tree(workdir):
  """{name: bytes} of the workdir's records (not checkpoints or event files)."""
  return {p.name: p.read_bytes() for p in workdir.iterdir()
          if p.is_file() and not p.name.startswith("events.")}


def test_config_json_changes_only_once_a_checkpoint_of_the_new_config_is_saved(
    base_run, tmp_path, monkeypatch):
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir, workdir = _copy(base_run, tmp_path)
  first = json.loads((workdir / "config.json").read_text())
  assert first == workdir_lib.config_to_dict(_config(data_dir))
  # A resume under another learning rate that goes non-finite before its first save:
  # config.json still describes the checkpoints, which were never trained that way.
  changed = _config(data_dir, learning_rate=1e-3)  # the smoke variant has 3e-3
  assert changed.learning_rate != _config(data_dir).learning_rate
  with monkeypatch.context() as mp:
    mp.setattr(pipeline, "TrainIterator", _poison_from(2))
    with pytest.raises(train.NonFiniteLossError):
      train.train_and_evaluate(changed, workdir)
  assert json.loads((workdir / "config.json").read_text()) == first
  assert workdir_lib.read_config_history(workdir) == []
  assert workdir_lib.checkpoint_steps(workdir) == [2]
  # The same resume that trains and saves: config.json is now its config, and the one
  # it replaced is kept with the steps it trained.
  train.train_and_evaluate(changed, workdir)
  assert workdir_lib.checkpoint_steps(workdir)[-1] == STEPS
  assert json.loads((workdir / "config.json").read_text()) == \
      workdir_lib.config_to_dict(changed)
  assert workdir_lib.read_config_history(workdir) == [
      {"from_step": 0, "to_step": 2, "config": first}]
  assert not list(workdir.glob("*.tmp"))


def test_fresh_workdir_gets_config_json_only_with_its_first_checkpoint(base_run, tmp_path,
                                                                       monkeypatch):
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir, _ = base_run
  workdir = tmp_path / "fresh"
  monkeypatch.setattr(pipeline, "TrainIterator", _poison_from(0))
  with pytest.raises(train.NonFiniteLossError, match="No checkpoint was saved"):
    train.train_and_evaluate(_config(data_dir), workdir)
  assert workdir_lib.checkpoint_steps(workdir) == []
  assert not (workdir / "config.json").exists()


def _read_only(monkeypatch, err):
  """Every record write fails with ERR (a full disk, a read-only file system)."""
  real = os.open

  def failing_open(path, flags, *args, **kwargs):
    if flags & os.O_CREAT and str(path).endswith(".tmp"):
      raise OSError(err, os.strerror(err), path)
    return real(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", failing_open)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS], ids=["full_disk", "read_only"])
def test_a_failed_write_is_one_line_naming_the_path_and_what_was_kept(
    base_run, tmp_path, monkeypatch, err):
  data_dir, workdir = _copy(base_run, tmp_path)
  before = _tree(workdir)
  assert "val_history.jsonl" in before
  _read_only(monkeypatch, err)
  with pytest.raises(train.WorkdirError) as e:
    train.train_and_evaluate(_config(data_dir), workdir)
  message = str(e.value)
  assert "\n" not in message
  # The evaluation at step 4 is the first record of the resumed run.
  assert f"cannot write {workdir / 'val_history.jsonl'}: {os.strerror(err)}" in message
  assert f"kept: the checkpoints up to step 2 in {workdir / 'checkpoints'}" in message
  # Nothing damaged: the records are byte for byte as they were, no temporary is left.
  monkeypatch.undo()
  assert _tree(workdir) == before
  assert workdir_lib.checkpoint_steps(workdir) == [2]


def test_a_workdir_under_a_plain_file_is_one_line_without_traceback(tmp_path):
  (tmp_path / "file").write_text("a plain file")
  workdir = tmp_path / "file" / "run"
  p = subprocess.run(
      [sys.executable, "-m", "nerveseg_jax.train", "--config",
       str(REPO / "configs" / "unet.py") + ":smoke", f"--workdir={workdir}"],
      capture_output=True, text=True, timeout=300, cwd=REPO, env=SUBPROCESS_ENV)
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: cannot write {workdir}: Not a directory"), last
  assert last.endswith("nothing was written"), last
  assert (tmp_path / "file").read_text() == "a plain file"


@pytest.mark.parametrize("order", ["seed_first", "typo_first"])
def test_an_unknown_config_key_is_named_wherever_it_stands(order):
  keys = ["--config.seed=1", "--config.model.featurez=8"]
  if order == "typo_first":
    keys.reverse()
  p = subprocess.run(
      [sys.executable, "-m", "nerveseg_jax.train", "--config",
       str(REPO / "configs" / "unet.py") + ":smoke", *keys],
      capture_output=True, text=True, timeout=300, cwd=REPO, env=SUBPROCESS_ENV)
  assert p.returncode != 0
  assert "unknown config key 'model.featurez'" in p.stderr, p.stderr[-2000:]
  assert "'seed'" not in p.stderr and "Traceback" not in p.stderr


def test_saved_is_logged_only_once_the_checkpoint_is_committed(base_run, tmp_path,
                                                               monkeypatch, caplog):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  data_dir, workdir = _copy(base_run, tmp_path)
  # A slow disk: the background save commits a while after save() returned.
  real_finalize = ocp.CheckpointManager._finalize  # pylint: disable=protected-access

  def slow_finalize(self, *args, **kwargs):
    time.sleep(1.0)
    return real_finalize(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "_finalize", slow_finalize)
  seen = []

  class Committed(logging.Handler):
    def emit(self, record):
      msg = record.getMessage()
      if msg.startswith("saved checkpoint step"):
        step = int(msg.split()[-1])
        seen.append((step, (workdir / "checkpoints" / str(step)).is_dir()))

  caplog.set_level(logging.INFO)
  handler = Committed()
  logging.getLogger().addHandler(handler)
  try:
    train.train_and_evaluate(_config(data_dir), workdir)
  finally:
    logging.getLogger().removeHandler(handler)
  assert seen == [(STEPS, True)]


# ------------------------------------------------------------------ the one writer


def _spy(monkeypatch):
  """Records ('fsync', path) and ('replace', src, dst) as the writers call them."""
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    return real_fsync(fd)

  def replace(src, dst, *args, **kwargs):
    events.append(("replace", os.fspath(src), os.fspath(dst)))
    return real_replace(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  return events


def _check_written_whole(events, target):
  """TARGET came from a unique temporary beside it, synced, renamed, and the folder synced."""
  target = str(target)
  renames = [e for e in events if e[0] == "replace" and e[2] == target]
  assert renames, f"{target} was not written by rename"
  temps = [src for _, src, _ in renames]
  assert len(set(temps)) == len(temps), temps                 # a fresh name every time
  for tmp in temps:
    assert os.path.dirname(tmp) == os.path.dirname(target)    # same file system
    assert tmp != target + ".tmp" and not os.path.exists(tmp)
    i = events.index(("replace", tmp, target))
    assert ("fsync", tmp) in events[:i], f"{tmp} renamed before it was synced"
    assert ("fsync", os.path.dirname(target)) in events[i + 1:], "folder not synced"


def test_every_record_is_written_whole_through_one_writer(tmp_path, monkeypatch):
  events = _spy(monkeypatch)
  # Training records.
  run = tmp_path / "run"
  run.mkdir()
  config = unet.get_config("smoke")
  workdir_lib.record_config(run, config, resumed_from=0)
  config.learning_rate = 0.5
  workdir_lib.record_config(run, config, resumed_from=10)
  workdir_lib.append_val_history(run, 2, {"loss": 1.0})
  workdir_lib.append_val_history(run, 4, {"loss": 0.5})
  postprocess.save_calibration(run, postprocess.Calibration(), {"after": 1.0})
  postprocess.save_calibration(run, postprocess.Calibration(mask_threshold=0.4))
  for name in ("config.json", "config_history.jsonl", "val_history.jsonl", "calibration.json"):
    _check_written_whole(events, run / name)
  # Sweep tables (a stand-in train that writes its evaluations as the real one does).
  def fake_train(cfg, workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.append_val_history(workdir, 2, {"kaggle_score": float(cfg.learning_rate)})
    return {"step": 2, "preempted": False}
  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  sweep.run_sweep(unet.get_config("smoke"), {"runs": [{"name": "a", "learning_rate": 0.1},
                                                      {"name": "b", "learning_rate": 0.2}]},
                  tmp_path / "sweep")
  for path in (tmp_path / "sweep" / "sweep.json", tmp_path / "sweep" / "sweep.md",
               tmp_path / "sweep" / "a" / sweep.RESULT_FILE):
    _check_written_whole(events, path)
  # Predict's outputs.
  out = tmp_path / "out"
  predict.predict_path(_FakePredictor(), _images(tmp_path), out)
  for name in ("summary.json", "submission.csv", "report.html"):
    _check_written_whole(events, out / name)
  assert not list(tmp_path.rglob("*.tmp"))
