"""The benchmark command on 8 fake CPU devices: every field is measured and written."""

import json
import math

import jax

from nerveseg_jax import benchmark
from nerveseg_jax.configs import unet


def test_benchmark_runs_sharded_and_reports_every_field(smoke_run, tmp_path):
  config = unet.get_config("smoke")
  config.data.data_dir = str(smoke_run / "tfds")    # the session's synthetic set
  config.data.manual_dir = str(smoke_run / "raw")
  assert jax.device_count() == 8
  r = benchmark.run(config, steps=2, infer_batch=8)
  assert r["num_devices"] == 8 and r["mesh"] == {"data": 8, "fsdp": 1}
  for key in ("compile_s", "train_step_ms", "train_images_per_s", "flops_per_step_per_device",
              "pipeline_images_per_s", "goodput", "infer_latency_ms_batch1",
              "infer_frames_per_s", "compiled_bytes"):
    assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, key
  assert math.isclose(r["train_images_per_s_per_device"] * 8, r["train_images_per_s"])
  assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # no known CPU peak
  table = benchmark.format_table(r)
  assert "train images/s" in table and "MFU" in table and "n/a" in table
  (tmp_path / "b.json").write_text(json.dumps(r))
  assert json.loads((tmp_path / "b.json").read_text())["num_devices"] == 8


def test_peak_table():
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert benchmark.peak_tflops("TPU v5 lite") == 197.0
  assert benchmark.peak_tflops("TPU v5") == 459.0
  assert benchmark.peak_tflops("TPU v4") == 275.0
  assert benchmark.peak_tflops("cpu") is None
