"""Benchmark: train-step throughput, compile time, FLOPs/MFU, input goodput, inference.

  python -m nerveseg_jax.benchmark --config configs/unet.py[:variant] [--config.KEY=V]
      [--json OUT] [--steps 10] [--infer_batch 16] [--workdir RUN]

Measures on whatever devices JAX sees, with the project's own programs: the jitted,
sharded, donating train step of train_step.py and the one predict function of inference.py.
How to read the table: docs/performance.md.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

# Dense bf16 peak per device, TFLOP/s (the table). Matched against
# device_kind, most specific first ("TPU v5 lite" is v5e, plain "TPU v5" is v5p).
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("TPU v5 lite", 197.0),
               ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0))


def peak_tflops(device_kind: str) -> float | None:
  for name, peak in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def _timed(fn, n: int) -> list[float]:
  out = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return out


def _random_batch(config, mesh) -> dict[str, jax.Array]:
  from nerveseg_jax import sharding  # pylint: disable=g-import-not-at-top
  b = int(config.batch_size)
  h, w = (int(s) for s in config.data.image_size)
  rng = np.random.default_rng(0)
  mask = (rng.random((b, h, w, 1)) > 0.9).astype(np.float32)
  arrays = {"image": rng.standard_normal((b, h, w, 1)).astype(np.float32), "mask": mask,
            "has_nerve": mask.reshape(b, -1).max(1)}
  return {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in arrays.items()}


def run(config, *, steps: int = 10, infer_batch: int = 16, workdir: str | None = None,
        pipeline: bool = True, inference: bool = True) -> dict[str, Any]:
  """Runs every measurement and returns them as a flat dict (None where not measured)."""
  from nerveseg_jax import sharding, train_state, train_step  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  train_state.validate_config(config, mesh.size)
  dev = jax.devices()[0]
  out: dict[str, Any] = {
      "device_kind": dev.device_kind, "platform": dev.platform,
      "num_devices": jax.device_count(), "num_processes": jax.process_count(),
      "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
      "config": str(config.name), "batch_size": int(config.batch_size),
      "image_size": list(config.data.image_size), "dtype": str(config.dtype),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "host_cpus": os.cpu_count()}

  tx, schedule = train_state.make_optimizer(config)
  parts = train_state.model_parts(config)
  state, shardings = train_state.init_state(config, parts, tx, mesh)
  step = train_step.jit_train_step(config, parts, tx, schedule, mesh, shardings)
  health = train_step.initial_health(mesh)
  batch = _random_batch(config, mesh)
  t = time.perf_counter()
  compiled = step.lower(state, health, batch).compile()
  out["compile_s"] = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["flops_per_step_per_device"] = float(cost.get("flops", 0.0)) if cost else None
  mem = compiled.memory_analysis()
  out["compiled_bytes"] = (int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                               + mem.output_size_in_bytes) if mem is not None else None)

  def train_steps(n: int, batches) -> float:
    nonlocal state, health
    state, health, _, _ = compiled(state, health, next(batches))  # warm, not timed
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(n):
      state, health, _, _ = compiled(state, health, next(batches))
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / n

  def resident():
    while True:
      yield batch

  sec = train_steps(steps, resident())
  b = int(config.batch_size)
  out["train_step_ms"] = sec * 1e3
  out["train_images_per_s"] = b / sec
  out["train_images_per_s_per_device"] = b / sec / jax.device_count()
  peak = peak_tflops(dev.device_kind)
  out["peak_tflops_per_device"] = peak
  flops = out["flops_per_step_per_device"]
  out["mfu"] = (flops / sec / (peak * 1e12)) if (peak and flops) else None

  out["pipeline_images_per_s"] = out["goodput"] = None
  if pipeline:
    from nerveseg_jax.data import pipeline as pipe  # pylint: disable=g-import-not-at-top
    arrays = pipe.load_arrays(config.data, "train")
    it = pipe.TrainIterator(arrays, b, mesh, seed=int(config.seed))
    try:
      real = train_steps(steps, it)
    finally:
      getattr(it, "close", lambda: None)()
    out["pipeline_images_per_s"] = b / real
    out["goodput"] = sec / real  # step rate with the pipeline / with resident batches

  out["infer_latency_ms_batch1"] = out["infer_frames_per_s"] = None
  out["infer_images_per_s_model_size"] = None
  if inference:
    out.update(_inference(config, state, infer_batch, workdir, steps))
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    out["peak_device_bytes"] = stats.get("peak_bytes_in_use")
  else:
    out["peak_device_bytes"] = None
  return out


FRAME = (420, 580)  # a Kaggle ultrasound frame, (H, W)


def _inference(config, state, batch: int, workdir: str | None, n: int) -> dict[str, Any]:
  """Full-frame (420x580) inference through inference.Predictor, the one predict fn."""
  from nerveseg_jax import checkpoint, inference, train  # pylint: disable=g-import-not-at-top
  from nerveseg_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    if workdir is None:
      # Weights do not change the speed: save the benchmark's own state as a run.
      workdir = tmp
      workdir_lib.write_config(tmp, config)
      ckpt = checkpoint.TrainCheckpointer(tmp, keep=1, best_metric="kaggle_score")
      ckpt.save(0, state, train._meta(config, 0, None, "kaggle_score"))  # pylint: disable=protected-access
      ckpt.close()
    res = {}
    model_size = tuple(int(s) for s in config.data.image_size)
    # Full frames (420x580: resize in, network, resize back), then frames already at
    # the network's size: the forward-only figure to set beside other frameworks.
    for b, size, key in ((1, FRAME, "infer_latency_ms_batch1"),
                         (batch, FRAME, "infer_frames_per_s"),
                         (batch, model_size, "infer_images_per_s_model_size")):
      predictor = inference.Predictor(workdir, batch_size=b, which="latest")
      fn, x = predictor.forward(b, source_size=size)
      jax.block_until_ready(fn(x))  # compile
      times = _timed(lambda: fn(x), max(3, n))
      med = statistics.median(times)
      res[key] = med * 1e3 if key.endswith("_ms_batch1") else b / med
  return res


ROWS = (("device", "device_kind"), ("devices", "num_devices"), ("mesh", "mesh"),
        ("config", "config"), ("batch (global)", "batch_size"), ("image size", "image_size"),
        ("dtype", "dtype"), ("compile (s)", "compile_s"),
        ("train step (ms)", "train_step_ms"), ("train images/s", "train_images_per_s"),
        ("  per device", "train_images_per_s_per_device"),
        ("GFLOPs/step/device", "flops_per_step_per_device"), ("MFU", "mfu"),
        ("pipeline images/s", "pipeline_images_per_s"), ("input goodput", "goodput"),
        ("inference batch-1 (ms)", "infer_latency_ms_batch1"),
        ("inference frames/s", "infer_frames_per_s"),
        ("  at model size, images/s", "infer_images_per_s_model_size"),
        ("peak device memory (GiB)", "peak_device_bytes"),
        ("compiled step memory (GiB)", "compiled_bytes"))


def format_table(r: dict[str, Any]) -> str:
  lines = []
  for label, key in ROWS:
    v = r.get(key)
    if v is None:
      s = "n/a"
    elif key.endswith("bytes"):
      s = f"{v / 2**30:.3f}"
    elif key.startswith("flops"):
      s = f"{v / 1e9:.2f}"
    elif key == "mfu":
      s = f"{100 * v:.1f}%"
    elif isinstance(v, float):
      s = f"{v:.4g}"
    else:
      s = str(v)
    lines.append(f"{label:<28} {s}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  r = run(f.config, steps=f.steps, infer_batch=f.infer_batch, workdir=f.workdir,
          pipeline=f.pipeline, inference=f.inference)
  print(format_table(r))
  if f.json:
    write_json(r, f.json)
    print(f"wrote {f.json}")


def write_json(r: dict[str, Any], path: str) -> None:
  from nerveseg_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_text_atomic(out, json.dumps(r, indent=2) + "\n")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "config file[:variant]", lock_config=True)
  flags.mark_flags_as_required(["config"])
  flags.DEFINE_string("json", None, "also write the results as JSON here")
  flags.DEFINE_integer("steps", 10, "timed train steps (after one warm step)")
  flags.DEFINE_integer("infer_batch", 16, "batch for the inference frames/s figure")
  flags.DEFINE_string("workdir", None, "a trained run to time inference with (default: "
                      "the benchmark's own initial weights)")
  flags.DEFINE_bool("pipeline", True, "measure input goodput with the real pipeline")
  flags.DEFINE_bool("inference", True, "measure inference latency and throughput")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
