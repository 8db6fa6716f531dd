"""The training loop: `train_and_evaluate(config, workdir)`.

The command is `nerveseg-train` (nerveseg_jax/train.py), which only parses flags. The train
state (params, non-parameter model state, optimizer state, step) is created directly
into its shardings on the mesh, the step is compiled before the loop with donation,
and everything random is derived from (seed, step), so a resumed run, or one on a
different number of devices, follows the same trajectory.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pathlib
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from nerveseg_jax import checkpoint as ckpt_lib
from nerveseg_jax import cli
from nerveseg_jax import metrics as metrics_lib
from nerveseg_jax import sharding
from nerveseg_jax import summaries
from nerveseg_jax import train_state
from nerveseg_jax import train_step
from nerveseg_jax import xla_flags
from nerveseg_jax import workdir as workdir_lib

_BATCH_KEYS = train_step.BATCH_KEYS
log = logging.getLogger("nerveseg_jax.train")  # the lines `nerveseg-train` shows


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the run stopped without saving the bad state."""


class WorkdirError(RuntimeError):
  """The workdir could not be written; the message names the path and what was kept."""


# ----------------------------------------------------------------------------- loop


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """All processes stop together: one of them being told is enough."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
    return bool(np.any(flags))


def params_digest(params: Any) -> str:
  """sha256 of this process's view of the full parameters (compare across processes/runs)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Replicated arrays come back as the local replica, so diverged replicas show up.
    host = multihost_utils.process_allgather(params, tiled=True)
  else:
    host = jax.device_get(params)
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def _log_compiled(name: str, compiled, seconds: float, writer) -> None:
  mem = None
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    pass
  msg = f"compiled {name} in {seconds:.1f}s"
  if mem is not None:
    gib = lambda b: b / 2**30
    msg += (f"; memory: arguments {gib(mem.argument_size_in_bytes):.3f} GiB, outputs "
            f"{gib(mem.output_size_in_bytes):.3f} GiB, temporaries "
            f"{gib(mem.temp_size_in_bytes):.3f} GiB, aliased "
            f"{gib(mem.alias_size_in_bytes):.3f} GiB")
  log.info(msg)
  writer.write_texts(0, {f"compile/{name}": msg})


def checkpoint_meta(config, step: int, metrics: Mapping[str, float] | None, best_metric: str) -> dict:
  return {"step": int(step), "seed": int(config.seed),
          "model": workdir_lib.config_to_dict(config)["model"], "best_metric": best_metric,
          "metrics": dict(metrics or {})}


def save_untrained(config: ml_collections.ConfigDict, workdir) -> None:
  """Saves CONFIG's freshly initialised model into WORKDIR as a run at step 0.

  For what needs a run but not a trained one: latency and API checks, whose speed and
  contracts do not depend on the weights.
  """
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = train_state.make_optimizer(config)
  state, _ = train_state.init_state(config, tx, mesh)
  workdir_lib.write_config(workdir, config)
  checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=1)
  try:
    checkpointer.save(0, state, checkpoint_meta(config, 0, None, "kaggle_score"))
  finally:
    checkpointer.close()


# What a full disk, a read-only file system or a missing permission raise, wherever the
# error lost the path it was writing.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _write_failure(e: OSError, workdir) -> str | None:
  """The one-line message for E if it is a failure to write WORKDIR, else None."""
  if e.filename is not None:
    path = str(e.filename)
    if not (path == str(workdir) or path.startswith(str(workdir).rstrip("/") + "/")):
      return None  # another file (the data, an init_from checkpoint): not the workdir's
  elif e.errno in _WRITE_ERRNOS:
    path = str(workdir)
  else:
    return None
  try:
    steps = workdir_lib.checkpoint_steps(workdir)
    exists = workdir.exists()
  except OSError:
    steps, exists = [], True
  if steps:
    # Every record is written atomically, so a failed write left the previous file whole.
    kept = (f"kept: the checkpoints up to step {steps[-1]} in "
            f"{workdir / workdir_lib.CHECKPOINT_DIR} and the records as they were before "
            "this write; run the same command to resume once it is fixed")
  elif exists:
    kept = f"kept: {workdir} as it was (no checkpoint had been saved)"
  else:
    kept = "nothing was written"
  return f"cannot write {path}: {e.strerror or e}; {kept}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, Any]:
  """Trains (resuming from WORKDIR/checkpoints if any) and returns the final metrics.

  A workdir that cannot be written (a plain file in its path, a full disk, a read-only
  file system) raises WorkdirError, naming the path and what the workdir kept.
  """
  xla_flags.configure()
  workdir = workdir_lib.as_path(workdir)
  try:
    return _train_and_evaluate(config, workdir)
  except OSError as e:
    message = _write_failure(e, workdir)
    if message is None:
      raise
    raise WorkdirError(message) from e


def due(step: int, every: int, total: int) -> bool:
  """Is it time for a periodic action at `step` (every N steps, and at the last)?"""
  return step == total or (every > 0 and step % every == 0)


def evaluate_fold(eval_step, state, arrays, batch_size: int, mesh) -> dict[str, float]:
  """The metrics of `state` on every frame of `arrays` (the validation fold)."""
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  total, n = None, 0
  for batch in pipeline.eval_batches(arrays, batch_size, mesh):
    m = eval_step(state, {k: batch[k] for k in (*_BATCH_KEYS, "valid")})
    total = m if total is None else total.merge(m)
    n += int(batch["valid"].shape[0])
  if total is None:
    return {}
  values = metrics_lib.to_host(total.compute())
  values["images_per_sec"] = n / max(time.perf_counter() - t, 1e-9)
  return values


def check_health(health, checkpointer, step: int) -> None:
  """Raises NonFiniteLossError if any step so far went non-finite (nothing is saved)."""
  bad_step, bad_loss = (float(x) for x in np.asarray(jax.device_get(health)))
  if bad_step >= 0:
    checkpointer.wait()
    last = checkpointer.latest_step()
    raise NonFiniteLossError(
        f"non-finite loss {bad_loss} at step {int(bad_step)} (checked at step {step}); "
        "stopping without saving. "
        + (f"The last good checkpoint is step {last} in {checkpointer.directory}."
           if last is not None else "No checkpoint was saved.")
        + " Lower learning_rate or check the data.")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(config.mesh)
  train_state.validate_config(config, mesh.size)
  classifier = train_state.is_classifier(config)
  best_metric = "presence_accuracy" if classifier else "kaggle_score"
  num_steps = int(config.num_train_steps)
  every = lambda key: int(config[key])

  # The model check comes first, and the event files are written only once the train
  # state is built or restored: a workdir that does not fit (another model, a
  # config.json gone missing) is left exactly as it was.
  workdir_lib.check_model_config(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)
  done = workdir_lib.checkpoint_steps(workdir)
  start = done[-1] if done else 0
  if start >= num_steps:
    log.info("%s is already trained to step %d (num_train_steps=%d): nothing to do",
             workdir, start, num_steps)
    return {"step": start, "start_step": start, "preempted": False}

  def on_saved(step: int) -> None:
    del step  # config.json becomes this config once a checkpoint of it is on disk
    if jax.process_index() == 0:
      workdir_lib.record_config(workdir, config, resumed_from=start)

  checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=every("keep_checkpoints"),
                                            on_saved=on_saved)
  train_arrays = pipeline.load_arrays(config.data, "train")
  val_arrays = pipeline.load_arrays(config.data, "val") if int(config.data.fold) >= 0 else None
  _log_header(config, workdir, mesh, train_arrays, val_arrays, start)
  writer = None
  try:
    s = train_state.setup(config, mesh, checkpointer)
    state = s.state
    start = s.start_step  # Orbax's view of the latest step (the same committed step)
    writer = summaries.EventWriter(workdir, enabled=jax.process_index() == 0)
    summaries.write_hparams(writer, config)
    panel = (summaries.ValidationPanel(config, s.parts, val_arrays, mesh)
             if val_arrays is not None and not classifier else None)
    train_iter = pipeline.TrainIterator(train_arrays, int(config.batch_size), mesh,
                                        seed=int(config.seed), start_step=start)
    health = train_step.initial_health(mesh)
    # Compiled before the loop, against the first batch's shapes and shardings.
    batch = next(train_iter)
    t0 = time.perf_counter()
    compiled = train_step.jit_train_step(config, s.parts, s.tx, s.schedule, mesh,
                                         s.shardings).lower(state, health, {
                                             k: jax.ShapeDtypeStruct(batch[k].shape,
                                                                     batch[k].dtype,
                                                                     sharding=batch[k].sharding)
                                             for k in _BATCH_KEYS}).compile()
    compile_s = time.perf_counter() - t0
    _log_compiled("train_step", compiled, compile_s, writer)
    eval_step = jax.jit(train_step.make_eval_step(config, s.parts))

    final: dict[str, Any] = {"compile_seconds": compile_s, "start_step": start}
    history: list[dict[str, float]] = []  # train metrics at each log step (the loss curve)
    progress = _Progress(start, num_steps, int(config.batch_size))
    train_metrics, val_values, step, preempted = None, {}, start, False
    with _Preemption() as preemption:
      while step < num_steps:
        batch = batch if batch is not None else next(train_iter)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, health, m, extras = compiled(state, health, {k: batch[k] for k in _BATCH_KEYS})
        batch, step = None, step + 1
        train_metrics = m if train_metrics is None else train_metrics.merge(m)
        checkpointer.poll()  # confirms (logs, records) a background save that finished

        if due(step, every("log_every_steps"), num_steps):
          check_health(health, checkpointer, step)
          values = {**metrics_lib.to_host(train_metrics.compute()),
                    **metrics_lib.to_host(extras), **progress.rates(step)}
          writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
          final.update({f"train_{k}": v for k, v in values.items()})
          history.append({"step": step, **values})
          log.info(progress.line(step, values))
          train_metrics = None

        val_now = val_arrays is not None and due(step, every("eval_every_steps"), num_steps)
        if val_now:
          val_values = evaluate_fold(eval_step, state, val_arrays,
                                     int(config.eval_batch_size), mesh)
          writer.write_scalars(step, {f"val/{k}": v for k, v in val_values.items()})
          if panel is not None:
            panel.write(writer, step, state)
          if jax.process_index() == 0:
            workdir_lib.append_val_history(workdir, step, val_values)
          final.update({f"val_{k}": v for k, v in val_values.items()})
          log.info("step %d validation: %s", step, _fmt_metrics(val_values))
          progress.pause_until_now()  # evaluation time is not training speed

        preempted = preemption.agreed()
        if preempted or due(step, every("checkpoint_every_steps"), num_steps):
          check_health(health, checkpointer, step)  # never save a non-finite state
          scored = val_values if (val_now and val_values) else None
          checkpointer.save(step, state, checkpoint_meta(config, step, scored, best_metric),
                            metrics=scored)
        if preempted:
          checkpointer.wait()
          log.warning("SIGTERM: saved checkpoint at step %d in %s; run the same command "
                      "again to resume", step, checkpointer.directory)
          break
    getattr(train_iter, "close", lambda: None)()
  finally:
    # Also on errors: lets a pending asynchronous save finish (it is of a good state).
    checkpointer.close()
    if writer is not None:
      writer.close()
  final.update({"step": step, "preempted": preempted, "history": history})
  if os.environ.get("NERVESEG_PARAMS_DIGEST"):  # replicas' agreement, for tests
    final["params_sha256"] = params_digest(state["params"])
  return final


def _fmt_metrics(values: Mapping[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()) if k != "images_per_sec")


def _log_header(config, workdir, mesh, train_arrays, val_arrays, start: int) -> None:
  """One block saying what runs where, on what, and from which step."""
  devices = jax.devices()
  log.info("run      %s (model %s, %s)", config.get("name", "?"), config.model.name,
           config.get("dtype", "float32"))
  log.info("workdir  %s", workdir)
  log.info("devices  %d x %s over %d process(es); mesh %s", len(devices),
           devices[0].device_kind, jax.process_count(),
           dict(zip(mesh.axis_names, mesh.devices.shape)))
  val = "none (data.fold=-1)"
  if val_arrays is not None:
    subjects = sorted({int(x) for x in np.asarray(val_arrays.subject).tolist()})
    val = (f"{len(val_arrays)} frames of subjects {subjects} "
           f"(fold {int(config.data.fold)} of {int(config.data.num_folds)})")
  log.info("data     %s: train %d frames; validation %s", config.data.source,
           len(train_arrays), val)
  log.info("steps    %s to %d, batch %d", f"resuming at step {start}" if start else "fresh",
           int(config.num_train_steps), int(config.batch_size))


class _Progress:
  """Steps/s, images/s and ETA over training time only (evaluations excluded)."""

  def __init__(self, start: int, total: int, batch: int):
    self.total, self.batch = total, batch
    self.step0, self.t0 = start, time.perf_counter()

  def rates(self, step: int) -> dict[str, float]:
    dt = max(time.perf_counter() - self.t0, 1e-9)
    sps = (step - self.step0) / dt
    self.step0, self.t0 = step, time.perf_counter()
    self.last = sps
    return {"steps_per_sec": sps, "images_per_sec": sps * self.batch}

  def pause_until_now(self) -> None:
    self.t0 = time.perf_counter()

  def line(self, step: int, values: Mapping[str, float]) -> str:
    eta = (self.total - step) / self.last if self.last > 0 else float("inf")
    parts = [f"step {step}/{self.total}", f"loss {values['loss']:.4f}"]
    if "dice" in values:
      parts.append(f"dice {values['dice']:.3f}")
    parts += [f"{values['steps_per_sec']:.2f} steps/s",
              f"{values['images_per_sec']:.1f} img/s", f"ETA {cli.duration(eta)}"]
    return "  ".join(parts)
