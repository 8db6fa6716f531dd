"""Benchmark: train-step throughput, compile time, FLOPs/MFU, input goodput, inference.

  python -m nerveseg_jax.benchmark --config configs/unet.py[:variant] [--config.KEY=V]
      [--json OUT] [--steps 10] [--infer_batch 16] [--workdir RUN] [--fold]
  python -m nerveseg_jax.benchmark --config unet:synthetic --notrain --noinference \
      --pipeline_data=config [--device_resident=auto|on|off]     (the input pipeline alone)

Measures on whatever devices JAX sees, with the project's own programs: the jitted,
sharded, donating train step of train_step.py, the input pipeline's TrainIterator, and
the one predict function of inference.py. The data are synthetic and made in memory
(--pipeline_data=synthetic, the default), so the command needs neither TensorFlow nor a
dataset; --pipeline_data=config times the config's own data set instead. With the train
step, the pipeline is timed as the step's input (goodput); without it (--notrain),
TrainIterator alone, and with the on-device augmentation.
How to read the table: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Callable

import jax
import numpy as np

from nerveseg_jax import cli
from nerveseg_jax import hostinfo

# Dense peak per device, TFLOP/s, by compute dtype. Matched against device_kind, most
# specific first ("TPU v5 lite" is v5e, plain "TPU v5" is v5p). float32 on GPUs is the
# non-tensor-core rate (TF32 tensor cores, if XLA uses them, can exceed it).
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("TPU v5 lite", 197.0),
               ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0))
PEAK_TFLOPS_FP32 = (("H100", 67.0), ("H200", 67.0), ("A100", 19.5))

KAGGLE_TRAIN_FRAMES = 5635  # labelled frames of the Kaggle train set
FRAME = (420, 580)          # a Kaggle ultrasound frame, (H, W)
NUM_FOLDS = 5


def peak_tflops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  table = PEAK_TFLOPS_FP32 if dtype == "float32" else PEAK_TFLOPS
  for name, peak in table:
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


def synthetic_arrays(n: int, size: tuple[int, int], *, seed: int = 0, subjects: int = 47):
  """n uint8 frames at the network's size, made in memory (no decoding, no TFDS).

  Pixel values do not change the speed of a gather or a step; what matters is the
  shape and count, so the Kaggle set's count is the default (the mask is a box in
  ~41% of frames, the Kaggle share).
  """
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  h, w = size
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (n, h, w, 1), dtype=np.uint8)
  has = rng.random(n) < 0.41
  mask = np.zeros((n, h, w, 1), np.uint8)
  mask[has, h // 3:h // 2, w // 3:w // 2] = 1
  return pipeline.Arrays(image=image, mask=mask, has_nerve=has, labeled=np.ones(n, bool),
                         id=np.array([f"s{i}" for i in range(n)]),
                         subject=(np.arange(n) % subjects).astype(np.int32))


def _split_fold(arrays, fold: int = 0):
  """(train, val) of a subject-wise fold, as the config's data.fold would give."""
  from nerveseg_jax.data import folds  # pylint: disable=g-import-not-at-top
  val = folds.select(arrays.subject, NUM_FOLDS, fold, "val")
  return arrays.take(np.flatnonzero(~val)), arrays.take(np.flatnonzero(val))


def _percentile_ms(times: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(times), q)) * 1e3


def run(config, *, steps: int = 10, infer_batch: int = 16, workdir: str | None = None,
        train: bool = True, pipeline: bool = True, pipeline_data: str = "synthetic",
        frames: int = KAGGLE_TRAIN_FRAMES, device_resident: bool | None = None,
        inference: bool = True, latency_iters: int = 50, fold: bool = False,
        fold_steps: int = 100, keep_going: bool = False,
        on_part: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
  """Runs the selected measurements and returns them as a flat dict (None where not run).

  pipeline: with train, the step's input rate and goodput; without, TrainIterator alone.
  device_resident: where the pipeline holds its set; None: the synthetic set on the
    devices (an accelerator's default), the config's set as train would hold it.
  keep_going: a failing part is recorded under "errors" and the rest still run.
  on_part: called with the results so far after each part (to write them as they come).
  """
  from nerveseg_jax import sharding, train_state, train_step  # pylint: disable=g-import-not-at-top
  if pipeline_data not in ("synthetic", "config"):
    raise ValueError(f"pipeline_data={pipeline_data!r}: use 'synthetic' or 'config'")
  if fold and not train:
    raise ValueError("the fold measurement needs the train step: drop --notrain")
  mesh = sharding.make_mesh(config.mesh)
  train_state.validate_config(config, mesh.size)
  dev = jax.devices()[0]
  dtype = str(config.dtype)
  out: dict[str, Any] = {
      "device_kind": dev.device_kind, "platform": dev.platform,
      "num_devices": jax.device_count(), "num_processes": jax.process_count(),
      "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
      "config": str(config.name), "model": str(config.model.name),
      "batch_size": int(config.batch_size), "image_size": list(config.data.image_size),
      "dtype": dtype, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_cpus": os.cpu_count(), "host": hostinfo.describe(hostinfo.cpu()),
      "jax_version": jax.__version__, "errors": {}}
  for key in ("compile_s", "flops_per_step_per_device", "compiled_bytes", "train_step_ms",
              "train_images_per_s", "train_images_per_s_per_device", "mfu",
              "pipeline_images_per_s", "goodput", "iterator_images_per_s",
              "iterator_augment_images_per_s", "device_resident",
              "infer_latency_ms_batch1", "infer_latency_ms_batch1_p95",
              "infer_frames_per_s", "infer_images_per_s_model_size", "peak_device_bytes"):
    out[key] = None
  out["peak_tflops_per_device"] = peak_tflops(dev.device_kind, dtype)
  b = int(config.batch_size)

  def part(name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
    try:
      out.update(fn() or {})
    except Exception as e:  # pylint: disable=broad-except
      if not keep_going:
        raise
      out["errors"][name] = f"{type(e).__name__}: {e}"
    if on_part is not None:
      on_part(out)

  ctx: dict[str, Any] = {}
  if train or inference:  # the pipeline alone needs no model
    s = train_state.setup(config, mesh)
    tx, schedule, parts, shardings = s.tx, s.schedule, s.parts, s.shardings
    ctx.update(state=s.state, health=train_step.initial_health(mesh))

  def train_steps(n: int, batches) -> float:
    compiled = ctx["compiled"]
    ctx["state"], ctx["health"], _, _ = compiled(ctx["state"], ctx["health"], next(batches))
    jax.block_until_ready(ctx["state"])  # warm, not timed
    t = time.perf_counter()
    for _ in range(n):
      ctx["state"], ctx["health"], _, _ = compiled(ctx["state"], ctx["health"], next(batches))
    jax.block_until_ready(ctx["state"])
    return (time.perf_counter() - t) / n

  def measure_train() -> dict[str, Any]:
    res: dict[str, Any] = {}
    step = train_step.jit_train_step(config, parts, tx, schedule, mesh, shardings)
    batch = _random_batch(config, mesh)
    t = time.perf_counter()
    ctx["compiled"] = compiled = step.lower(ctx["state"], ctx["health"], batch).compile()
    res["compile_s"] = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    res["flops_per_step_per_device"] = float(cost.get("flops", 0.0)) if cost else None
    mem = compiled.memory_analysis()
    res["compiled_bytes"] = (int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                 + mem.output_size_in_bytes) if mem is not None else None)

    def resident():
      while True:
        yield batch

    sec = ctx["resident_s"] = train_steps(steps, resident())
    res["train_step_ms"] = sec * 1e3
    res["train_images_per_s"] = b / sec
    res["train_images_per_s_per_device"] = b / sec / jax.device_count()
    peak, flops = out["peak_tflops_per_device"], res["flops_per_step_per_device"]
    res["mfu"] = (flops / sec / (peak * 1e12)) if (peak and flops) else None
    return res

  def train_iterator():
    from nerveseg_jax.data import pipeline as pipe  # pylint: disable=g-import-not-at-top
    resident = device_resident
    if pipeline_data == "config":
      arrays = pipe.load_arrays(config.data, "train")
    else:
      size = tuple(int(s) for s in config.data.image_size)
      arrays = _split_fold(synthetic_arrays(frames, size))[0]
      # The whole set held on the devices, the accelerator default (pipeline.resident_fits).
      resident = True if resident is None else resident
    it = pipe.TrainIterator(arrays, b, mesh, seed=int(config.seed), device_resident=resident)
    return it, {"device_resident": it.device_resident, "pipeline_frames": len(arrays)}

  def measure_pipeline() -> dict[str, Any]:
    it, res = train_iterator()
    try:
      real = train_steps(steps, it)
    finally:
      it.close()
    # Step rate with the pipeline / with one batch already on device.
    return {**res, "pipeline_images_per_s": b / real, "goodput": ctx["resident_s"] / real}

  def measure_iterator() -> dict[str, Any]:
    from nerveseg_jax.data import augment  # pylint: disable=g-import-not-at-top
    it, res = train_iterator()
    aug_cfg = config.data.augment
    aug = jax.jit(lambda k, x: augment.augment(k, x["image"], x["mask"], aug_cfg))
    key = jax.random.key(int(config.seed))

    def images_per_s(fn) -> float:
      for _ in range(2):  # warm: compiles, fills the prefetch queue
        jax.block_until_ready(fn())
      return b / statistics.fmean(_timed(fn, max(1, steps)))

    try:
      res["iterator_images_per_s"] = images_per_s(lambda: next(it))
      if aug_cfg.enabled:
        res["iterator_augment_images_per_s"] = images_per_s(
            lambda: aug(jax.random.fold_in(key, it.step), next(it)))
    finally:
      it.close()
    return res

  if train:
    part("train", measure_train)
    if "compiled" not in ctx:  # the train step failed: nothing to feed
      for name, wanted in (("pipeline", pipeline), ("fold", fold)):
        if wanted:
          out["errors"][name] = "not run: the train step failed"
      pipeline = fold = False
  if pipeline:
    part("pipeline", measure_pipeline if train else measure_iterator)
  if fold:
    part("fold", lambda: _fold(config, mesh, parts, ctx, train_steps, frames, fold_steps,
                               out.get("compile_s")))
  if inference:
    part("inference", lambda: _inference(
        config, parts.merge(ctx["state"]["params"], ctx["state"]["rest"], None),
        infer_batch, workdir, steps, latency_iters))
  if dev.platform != "cpu":
    out["peak_device_bytes"] = (dev.memory_stats() or {}).get("peak_bytes_in_use")
  if on_part is not None:
    on_part(out)
  return out


def _fold(config, mesh, parts, ctx, train_steps, frames: int, steps: int,
          compile_s: float | None) -> dict[str, Any]:
  """A short run of fold 0 (train steps, validation passes, a checkpoint save), timed,
  and the config's full 5-fold cross-validation extrapolated from it.

  The same parts as the train command (its step, TrainIterator, eval step, eval_batches,
  TrainCheckpointer) on the in-memory synthetic set, so it needs no TensorFlow.
  """
  from nerveseg_jax import checkpoint, train_step  # pylint: disable=g-import-not-at-top
  from nerveseg_jax.data import pipeline as pipe  # pylint: disable=g-import-not-at-top
  size = tuple(int(s) for s in config.data.image_size)
  train_arrays, val_arrays = _split_fold(synthetic_arrays(frames, size))
  eval_step = jax.jit(train_step.make_eval_step(config, parts))
  keys = (*train_step.BATCH_KEYS, "valid")

  def evaluate() -> float:
    t = time.perf_counter()
    total = None
    for batch in pipe.eval_batches(val_arrays, int(config.eval_batch_size), mesh):
      m = eval_step(ctx["state"], {k: batch[k] for k in keys})
      total = m if total is None else total.merge(m)
    if total is not None:
      jax.device_get(total.compute())
    return time.perf_counter() - t

  t_run = time.perf_counter()
  it = pipe.TrainIterator(train_arrays, int(config.batch_size), mesh, seed=int(config.seed))
  try:
    step_s = train_steps(steps, it)
  finally:
    it.close()
  first_eval_s = evaluate()  # compiles the eval step
  eval_s = evaluate()
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = checkpoint.TrainCheckpointer(tmp, keep=1)
    t = time.perf_counter()
    ckpt.save(steps, ctx["state"], {"step": steps, "seed": int(config.seed)})
    ckpt.wait()
    save_s = time.perf_counter() - t
    ckpt.close()
  wall = time.perf_counter() - t_run
  n = int(config.num_train_steps)
  evals = math.ceil(n / int(config.eval_every_steps))
  saves = math.ceil(n / int(config.checkpoint_every_steps))
  fold_s = ((compile_s or 0.0) + (first_eval_s - eval_s) + n * step_s + evals * eval_s
            + saves * save_s)
  return {"fold_short_steps": steps, "fold_short_wall_s": wall + (compile_s or 0.0),
          "fold_step_ms": step_s * 1e3, "fold_eval_s": eval_s,
          "fold_eval_compile_s": first_eval_s - eval_s, "fold_save_s": save_s,
          "fold_train_frames": len(train_arrays), "fold_val_frames": len(val_arrays),
          "fold_num_train_steps": n, "fold_estimate_s": fold_s,
          "cv5_estimate_s": NUM_FOLDS * fold_s}


def _inference(config, model, batch: int, workdir: str | None, n: int,
               latency_iters: int) -> dict[str, Any]:
  """Full-frame (420x580) inference through inference.Predictor, the one predict fn;
  of WORKDIR's run, else of MODEL in memory (weights do not change the speed)."""
  from nerveseg_jax import inference  # pylint: disable=g-import-not-at-top

  def predictor(b: int):
    if workdir is not None:
      return inference.Predictor(workdir, batch_size=b, which="latest")
    return inference.Predictor.from_model(config, model, batch_size=b)

  res = {}
  model_size = tuple(int(s) for s in config.data.image_size)
  # Full frames (420x580: resize in, network, resize back), then frames already at
  # the network's size: the forward-only figure to set beside other frameworks.
  for b, size, key in ((1, FRAME, "infer_latency_ms_batch1"),
                       (batch, FRAME, "infer_frames_per_s"),
                       (batch, model_size, "infer_images_per_s_model_size")):
    fn, x = predictor(b).forward(b, source_size=size)
    jax.block_until_ready(fn(x))  # compile
    if b == 1:
      times = _timed(lambda: fn(x), max(3, latency_iters))
      res[key] = _percentile_ms(times, 50)
      res[key + "_p95"] = _percentile_ms(times, 95)
    else:
      res[key] = b / statistics.median(_timed(lambda: fn(x), max(3, n)))
  return res


ROWS = (("host", "host"), ("device", "device_kind"), ("devices", "num_devices"), ("mesh", "mesh"),
        ("config", "config"), ("batch (global)", "batch_size"), ("image size", "image_size"),
        ("dtype", "dtype"), ("compile (s)", "compile_s"),
        ("train step (ms)", "train_step_ms"), ("train images/s", "train_images_per_s"),
        ("  per device", "train_images_per_s_per_device"),
        ("GFLOPs/step/device", "flops_per_step_per_device"), ("MFU", "mfu"),
        ("pipeline images/s", "pipeline_images_per_s"), ("input goodput", "goodput"),
        ("pipeline alone, images/s", "iterator_images_per_s"),
        ("  + on-device augment", "iterator_augment_images_per_s"),
        ("  set on device", "device_resident"),
        ("inference batch-1 p50 (ms)", "infer_latency_ms_batch1"),
        ("inference batch-1 p95 (ms)", "infer_latency_ms_batch1_p95"),
        ("inference frames/s", "infer_frames_per_s"),
        ("  at model size, images/s", "infer_images_per_s_model_size"),
        ("short fold run (s)", "fold_short_wall_s"),
        ("one fold, estimated (s)", "fold_estimate_s"),
        ("5-fold CV, estimated (s)", "cv5_estimate_s"),
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
  for name, err in (r.get("errors") or {}).items():
    lines.append(f"{'FAILED ' + name:<28} {err}")
  return "\n".join(lines)


def write_json(r: dict[str, Any], path: str) -> None:
  from nerveseg_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_text_atomic(out, json.dumps(r, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.parser("nerveseg-benchmark",
                 "Time a config's train step, input pipeline and inference on this "
                 "machine's devices (synthetic data: no download, no TensorFlow).",
                 "example:\n  nerveseg-benchmark --config unet --steps 20 --json bench.json")
  cli.add_config(p)
  p.add_argument("--json", default=None, help="also write the results as JSON here "
                 "(rewritten after each measurement, so a killed run keeps what it measured)")
  p.add_argument("--steps", type=int, default=10, help="timed train steps (after one warm step)")
  p.add_argument("--infer_batch", type=int, default=16,
                 help="batch for the inference frames/s figure")
  p.add_argument("--latency_iters", type=int, default=50,
                 help="timed batch-1 calls (for p50 and p95)")
  cli.add_workdir(p, required=False, help_text="a trained run to time inference with "
                  "(default: the benchmark's own initial weights)")
  cli.add_bool(p, "train", True, "measure the train step (compile, images/s, MFU)")
  cli.add_bool(p, "pipeline", True, "measure the input pipeline: its goodput as the train "
               "step's input; with --notrain, TrainIterator alone (and with augmentation)")
  p.add_argument("--pipeline_data", choices=("synthetic", "config"), default="synthetic",
                 help="synthetic: --frames frames made in memory, held on device (no "
                      "TensorFlow); config: the config's data set (TFDS)")
  p.add_argument("--device_resident", choices=("auto", "on", "off"), default="auto",
                 help="hold the pipeline's set on the devices and gather there (auto: the "
                      "synthetic set on, the config's set as train would hold it)")
  p.add_argument("--frames", type=int, default=KAGGLE_TRAIN_FRAMES,
                 help="synthetic set size (pipeline, fold)")
  cli.add_bool(p, "inference", True, "measure inference latency and throughput")
  cli.add_bool(p, "fold", False, "time a short fold-0 run and extrapolate the config's "
               "5-fold cross-validation")
  p.add_argument("--fold_steps", type=int, default=100, help="train steps of the short fold run")
  cli.add_bool(p, "keep_going", False, "record a failing measurement and run the rest")
  return cli.parse(p, argv)


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  f = parse_args(argv)
  f.config.lock()
  on_part = (lambda r: write_json(r, f.json)) if f.json else None
  r = run(f.config, steps=f.steps, infer_batch=f.infer_batch, workdir=f.workdir,
          train=f.train, pipeline=f.pipeline, pipeline_data=f.pipeline_data, frames=f.frames,
          device_resident={"auto": None, "on": True, "off": False}[f.device_resident],
          inference=f.inference, latency_iters=f.latency_iters, fold=f.fold,
          fold_steps=f.fold_steps, keep_going=f.keep_going, on_part=on_part)
  print(format_table(r))
  if f.json:
    print(f"wrote {f.json}")
  if r["errors"]:
    raise ValueError(f"{len(r['errors'])} measurement(s) failed: {', '.join(r['errors'])}")
  return 0



if __name__ == "__main__":
  sys.exit(main())
