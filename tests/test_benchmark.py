"""The benchmark command: every field measured on fake CPU devices, without TensorFlow."""

import json
import math
import subprocess
import sys

import pytest

from nerveseg_jax import benchmark
from nerveseg_jax.configs import unet
from conftest import REPO, import_probe

# Runs the command as `python -m` would and reports what it imported.
_PROBE = import_probe("nerveseg_jax.benchmark",
                      ("tensorflow", "tensorflow_datasets", "nerveseg_jax.train"))

_MEASURED = ("compile_s", "train_step_ms", "train_images_per_s", "flops_per_step_per_device",
             "pipeline_images_per_s", "goodput", "infer_latency_ms_batch1",
             "infer_latency_ms_batch1_p95", "infer_frames_per_s",
             "infer_images_per_s_model_size", "compiled_bytes", "fold_short_wall_s",
             "fold_step_ms", "fold_eval_s", "fold_save_s", "fold_estimate_s", "cv5_estimate_s")


def test_command_measures_everything_sharded_without_tensorflow(tmp_path):
  out = tmp_path / "b.json"
  res = subprocess.run(
      [sys.executable, "-c", _PROBE, "--config", "configs/unet.py:smoke", "--steps", "2",
       "--frames", "40", "--infer_batch", "8", "--latency_iters", "5", "--fold",
       "--fold_steps", "2", "--config.data.augment.enabled=False", "--json", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  imported = json.loads(res.stdout.split("IMPORTED ")[1])
  assert imported == {"tensorflow": False, "tensorflow_datasets": False,
                      "nerveseg_jax.train": False}
  r = json.loads(out.read_text())
  assert r["num_devices"] == 8 and r["mesh"] == {"data": 8, "fsdp": 1}  # conftest's 8
  for key in _MEASURED:
    assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, key
  assert r["errors"] == {} and r["device_resident"] is True
  assert r["infer_latency_ms_batch1_p95"] >= r["infer_latency_ms_batch1"]
  assert math.isclose(r["train_images_per_s_per_device"] * 8, r["train_images_per_s"])
  assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # no known CPU peak
  # 40 frames over 4 smoke subjects... the synthetic set's subjects: fold 0 held out.
  assert r["fold_train_frames"] + r["fold_val_frames"] == 40 and r["fold_val_frames"] > 0
  assert math.isclose(r["cv5_estimate_s"], 5 * r["fold_estimate_s"])
  assert r["fold_estimate_s"] > r["fold_num_train_steps"] * r["fold_step_ms"] / 1e3
  table = benchmark.format_table(r)
  assert "train images/s" in table and "5-fold CV" in table and "n/a" in table
  # CPU figures are comparable only on the same host, so the result names it.
  assert "(family " in r["host"] and table.splitlines()[0].startswith("host ")


def test_failing_parts_are_recorded_and_the_rest_reported(tmp_path, monkeypatch):
  from nerveseg_jax import train_step

  def broken(*args, **kwargs):
    raise RuntimeError("no step today")

  monkeypatch.setattr(train_step, "jit_train_step", broken)
  config = unet.get_config("smoke")
  seen = []
  missing = tmp_path / "no_run"
  r = benchmark.run(config, fold=True, workdir=str(missing), keep_going=True,
                    on_part=lambda res: seen.append(json.loads(json.dumps(res))))
  assert r["errors"]["train"] == "RuntimeError: no step today"
  assert r["errors"]["pipeline"] == r["errors"]["fold"] == "not run: the train step failed"
  assert str(missing) in r["errors"]["inference"]  # ran all the same
  # Written as it went: after the train part, then after the inference part.
  assert [list(s["errors"]) for s in seen[:2]] == [["train"],
                                                   ["train", "pipeline", "fold", "inference"]]
  assert "FAILED inference" in benchmark.format_table(r)
  monkeypatch.undo()
  with pytest.raises(FileNotFoundError, match="no_run"):
    benchmark.run(config, train=False, pipeline=False, workdir=str(missing))


def test_parts_that_need_the_train_step_refuse_without_it():
  with pytest.raises(ValueError, match="--notrain"):
    benchmark.run(unet.get_config("smoke"), train=False, fold=True)
  with pytest.raises(ValueError, match="pipeline_data"):
    benchmark.run(unet.get_config("smoke"), pipeline_data="tfds")


def test_the_pipeline_alone_builds_no_model(monkeypatch, capsys):
  from nerveseg_jax import train_state

  def no_model(*args, **kwargs):
    raise AssertionError("the pipeline alone built a train state")

  monkeypatch.setattr(train_state, "setup", no_model)
  monkeypatch.chdir(REPO)
  # The command as docs/data_pipeline.md gives it (on the in-memory set: no TensorFlow).
  assert benchmark.main(["--config", "configs/unet.py:smoke", "--notrain", "--noinference",
                          "--steps", "2", "--frames", "40", "--device_resident", "off"]) == 0
  rows = {line[:28].strip(): line[29:] for line in capsys.readouterr().out.splitlines()}
  assert rows["set on device"] == "False" and rows["train images/s"] == "n/a"
  assert float(rows["pipeline alone, images/s"]) > 0 and float(rows["+ on-device augment"]) > 0
  config = unet.get_config("smoke")
  for resident, augment in ((None, False), (False, True)):
    config.data.augment.enabled = augment
    r = benchmark.run(config, train=False, inference=False, steps=2, frames=40,
                      device_resident=resident)
    assert r["errors"] == {} and r["pipeline_frames"] < 40  # fold 0's training frames
    assert r["iterator_images_per_s"] > 0
    assert (r["iterator_augment_images_per_s"] is not None) == augment
    assert r["device_resident"] is (resident is None)  # the synthetic set: on by default
    assert r["train_images_per_s"] is r["goodput"] is r["infer_frames_per_s"] is None


def test_synthetic_arrays_are_the_pipeline_layout():
  a = benchmark.synthetic_arrays(30, (16, 24), subjects=6)
  assert a.image.shape == (30, 16, 24, 1) and a.image.dtype.name == "uint8"
  assert set(a.subject.tolist()) == set(range(6))
  assert (a.mask.reshape(30, -1).max(1) > 0).tolist() == a.has_nerve.tolist()
  train, val = benchmark._split_fold(a)  # pylint: disable=protected-access
  assert len(train) + len(val) == 30 and not set(train.subject) & set(val.subject)


def test_peak_table():
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert benchmark.peak_tflops("NVIDIA H200") == 989.0
  assert benchmark.peak_tflops("NVIDIA H200", "float32") == 67.0
  assert benchmark.peak_tflops("TPU v5 lite") == 197.0
  assert benchmark.peak_tflops("TPU v5") == 459.0
  assert benchmark.peak_tflops("TPU v4") == 275.0
  assert benchmark.peak_tflops("TPU v4", "float32") is None
  assert benchmark.peak_tflops("cpu") is None


def test_config_data_times_the_configs_own_set(smoke_run):
  config = unet.get_config("smoke")
  config.data.data_dir = str(smoke_run / "tfds")    # the session's synthetic set
  config.data.manual_dir = str(smoke_run / "raw")
  r = benchmark.run(config, steps=1, pipeline_data="config", inference=False)
  # The set's own training folds (not --frames), gathered on the host as CPU training does.
  assert r["pipeline_frames"] not in (None, benchmark.KAGGLE_TRAIN_FRAMES)
  assert r["device_resident"] is False and r["goodput"] > 0
