"""Training: `python -m nerveseg_jax.train --config configs/unet.py[:VARIANT] [--workdir DIR]`.

`train_and_evaluate(config, workdir)` is the loop; `main` only parses flags. The train
state (params, non-parameter model state, optimizer state, step) is created directly
into its shardings on the mesh, the step is compiled before the loop with donation,
and everything random is derived from (seed, step), so a resumed run, or one on a
different number of devices, follows the same trajectory.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from nerveseg_jax import checkpoint as ckpt_lib
from nerveseg_jax import cli_flags
from nerveseg_jax import metrics as metrics_lib
from nerveseg_jax import sharding
from nerveseg_jax import summaries
from nerveseg_jax import train_state
from nerveseg_jax import train_step
from nerveseg_jax import xla_flags
from nerveseg_jax import workdir as workdir_lib

_BATCH_KEYS = train_step.BATCH_KEYS


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
  logging.info(msg)
  writer.write_texts(0, {f"compile/{name}": msg})


def _meta(config, step: int, metrics: Mapping[str, float] | None, best_metric: str) -> dict:
  return {"step": int(step), "seed": int(config.seed), "data_step": int(step),
          "model": workdir_lib.config_to_dict(config)["model"], "best_metric": best_metric,
          "metrics": dict(metrics or {})}


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


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(config.mesh)
  train_state.validate_config(config, mesh.size)
  classifier = train_state.is_classifier(config)
  best_metric = "presence_accuracy" if classifier else "kaggle_score"

  # The model check comes first, and the event files are written only once the train
  # state is built or restored: a workdir that does not fit (another model, a
  # config.json gone missing) is left exactly as it was.
  workdir_lib.check_model_config(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)

  def on_saved(step: int) -> None:
    # config.json describes the checkpoints: it becomes this run's config only once a
    # checkpoint trained under it is on disk (`start`: where this run took over).
    del step
    if jax.process_index() == 0:
      workdir_lib.record_config(workdir, config, resumed_from=start)

  checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=int(config.keep_checkpoints),
                                            best_metric=best_metric, on_saved=on_saved)

  start = checkpointer.latest_step()
  num_steps = int(config.num_train_steps)
  if start is not None and start >= num_steps:
    logging.info("%s is already trained to step %d (num_train_steps=%d): nothing to do",
                 workdir, start, num_steps)
    checkpointer.close()
    return {"step": start, "start_step": start, "preempted": False}

  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  train_arrays = pipeline.load_arrays(config.data, "train")
  val_arrays = pipeline.load_arrays(config.data, "val") if int(config.data.fold) >= 0 else None
  try:
    tx, schedule = train_state.make_optimizer(config)
    parts = train_state.model_parts(config)
    if start is not None:
      # Restored straight into the shardings: no random init to compile on resume.
      _, abstract, shardings = train_state.abstract_state(config, tx, mesh)
      state, meta = checkpointer.restore(start, abstract)
      if int(meta.get("seed", config.seed)) != int(config.seed):
        logging.warning("config key seed=%s differs from the checkpoint's seed=%s: the run "
                        "continues with a different data order", config.seed, meta["seed"])
      data_step = int(meta.get("data_step", start))
      logging.info("resumed from %s step %d", checkpointer.directory, start)
    else:
      start = 0
      state, shardings = train_state.init_state(config, parts, tx, mesh)
      if config.init_from:
        state = train_state.apply_init_from(config, state, shardings)
      data_step = 0
    start = int(start)
    writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0)
    summaries.write_hparams(writer, config)
    panel = (summaries.ValidationPanel(config, parts, val_arrays, mesh)
             if val_arrays is not None and not classifier else None)

    # The data-iterator position saved with the checkpoint (one global batch per step).
    train_iter = pipeline.TrainIterator(train_arrays, int(config.batch_size), mesh,
                                        seed=int(config.seed), start_step=data_step)

    jit_step = train_step.jit_train_step(config, parts, tx, schedule, mesh, shardings)
    health = train_step.initial_health(mesh)

    first = next(train_iter)
    batch_abstract = {k: jax.ShapeDtypeStruct(first[k].shape, first[k].dtype,
                                              sharding=first[k].sharding) for k in _BATCH_KEYS}
    t0 = time.perf_counter()
    compiled = jit_step.lower(state, health, batch_abstract).compile()
    compile_s = time.perf_counter() - t0
    _log_compiled("train_step", compiled, compile_s, writer)
    eval_step = jax.jit(train_step.make_eval_step(config, parts))

    hooks = []
    report = periodic_actions.ReportProgress(num_train_steps=int(config.num_train_steps),
                                             writer=writer, every_steps=int(config.log_every_steps))
    if jax.process_index() == 0:
      hooks.append(report)

    def evaluate(step: int) -> dict[str, float]:
      if val_arrays is None:
        return {}
      t = time.perf_counter()
      total, n = None, 0
      for batch in pipeline.eval_batches(val_arrays, int(config.eval_batch_size), mesh):
        m = eval_step(state, {k: batch[k] for k in (*_BATCH_KEYS, "valid")})
        total = m if total is None else total.merge(m)
        n += int(batch["valid"].shape[0])
      if total is None:
        return {}
      values = metrics_lib.to_host(total.compute())
      values["images_per_sec"] = n / max(time.perf_counter() - t, 1e-9)
      writer.write_scalars(step, {f"val/{k}": v for k, v in values.items()})
      if panel is not None:
        panel.write(writer, step, state)
      if jax.process_index() == 0:
        workdir_lib.append_val_history(workdir, step, values)
      logging.info("step %d validation: %s", step,
                   ", ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
      return values

    def check_health(step: int) -> None:
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

    final: dict[str, Any] = {"compile_seconds": compile_s, "start_step": start}
    train_metrics = None
    history: list[dict[str, float]] = []  # train metrics at each log step (the loss curve)
    val_values: dict[str, float] = {}
    last_saved = start
    step = start
    preempted = False
    with _Preemption() as preemption, metric_writers.ensure_flushes(writer):
      batch = first
      while step < num_steps:
        if batch is None:
          batch = next(train_iter)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, health, m, extras = compiled(state, health, {k: batch[k] for k in _BATCH_KEYS})
        batch = None
        step += 1
        train_metrics = m if train_metrics is None else train_metrics.merge(m)
        for hook in hooks:
          hook(step)
        checkpointer.poll()  # confirms (logs, records) a background save that finished
        if step % int(config.log_every_steps) == 0 or step == num_steps:
          check_health(step)
          values = metrics_lib.to_host(train_metrics.compute())
          values.update(metrics_lib.to_host(extras))
          writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
          final.update({f"train_{k}": v for k, v in values.items()})
          history.append({"step": step, **values})
          train_metrics = None
        val_now = (step % int(config.eval_every_steps) == 0 or step == num_steps)
        if val_now:
          with report.timed("eval"):
            val_values = evaluate(step)
          final.update({f"val_{k}": v for k, v in val_values.items()})
        save_now = step % int(config.checkpoint_every_steps) == 0 or step == num_steps
        stop = preemption.agreed()
        if save_now or stop:
          check_health(step)  # never save the state of a run that went non-finite
          checkpointer.save(step, state, _meta(config, step, val_values if val_now else None,
                                               best_metric),
                            metrics=val_values if (val_now and val_values) else None)
          last_saved = step
        if stop:
          preempted = True
          checkpointer.wait()
          logging.warning("SIGTERM: saved checkpoint at step %d in %s; run the same command "
                          "again to resume", step, checkpointer.directory)
          break
      if last_saved != step:
        check_health(step)
        checkpointer.save(step, state, _meta(config, step, None, best_metric))
    train_iter_close = getattr(train_iter, "close", None)
    if train_iter_close:
      train_iter_close()
  finally:
    # Also on errors: lets a pending asynchronous save finish (it is of a good state).
    checkpointer.close()
  final.update({"step": step, "preempted": preempted, "history": history,
                "params_sha256": params_digest(state["params"])})
  return final


# ----------------------------------------------------------------------------- entry


def main(argv: list[str]) -> None:
  xla_flags.configure()  # before anything starts JAX
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  flags = cli_flags.define_flags()
  config = flags.config
  # A string, not pathlib: gs://bucket/run must keep its double slash.
  workdir = flags.workdir or cli_flags.default_workdir(cli_flags.config_arg(sys.argv), config)
  try:
    result = train_and_evaluate(config, workdir)
  except tfds_source.DataNotFoundError as e:
    raise SystemExit(f"error: {e}") from None
  except (ckpt_lib.CheckpointMismatchError, NonFiniteLossError, WorkdirError, ValueError,
          FileNotFoundError) as e:
    # User-caused errors name their config key or file; the traceback only at debug.
    logging.debug("traceback", exc_info=True)
    raise SystemExit(f"error: {e}") from None
  shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
           if k != "history"}
  print(f"done: {workdir}: {shown}")
  if result.get("preempted"):
    # 128 + SIGTERM, as if the signal had ended the process: schedulers (SLURM requeue,
    # JobSet/XPK restart policies) then restart the job, which resumes from the workdir.
    print(f"preempted: checkpoint saved in {workdir}; run the same command to resume")
    raise SystemExit(143)


def run() -> None:
  """Console-script entry (`nerveseg-train`)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.INFO)
  app.run(main, flags_parser=cli_flags.parse_flags)


if __name__ == "__main__":
  run()
