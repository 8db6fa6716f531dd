"""Training: `python -m nerveseg_jax.train --config configs/unet.py[:VARIANT] [--workdir DIR]`.

`train_and_evaluate(config, workdir)` is the loop; `main` only parses flags. The train
state (params, non-parameter model state, optimizer state, step) is created directly
into its shardings on the mesh, the step is compiled before the loop with donation,
and everything random is derived from (seed, step), so a resumed run, or one on a
different number of devices, follows the same trajectory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from nerveseg_jax import checkpoint as ckpt_lib
from nerveseg_jax import losses
from nerveseg_jax import metrics as metrics_lib
from nerveseg_jax import sharding

CLASSIFIER_MODELS = ("inception_resnet_v2",)
_BATCH_KEYS = ("image", "mask", "has_nerve")


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the run stopped without saving the bad state."""


# ----------------------------------------------------------------------------- setup


def _is_classifier(config: ml_collections.ConfigDict) -> bool:
  return str(config.model.name) in CLASSIFIER_MODELS


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
  """AdamW with linear warmup then cosine decay to 0, after global-norm clipping."""
  steps = int(config.num_train_steps)
  warmup = min(int(config.warmup_steps), max(steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(config.learning_rate), warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=0.0)
  # Decay only kernels: norms and biases are scale/offsets that decay would distort.
  mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
  parts.append(optax.adamw(schedule, weight_decay=float(config.weight_decay), mask=mask))
  return optax.chain(*parts), schedule


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Errors a user can cause, each naming its config key."""
  for key in ("batch_size", "eval_batch_size", "num_train_steps", "log_every_steps",
              "eval_every_steps", "checkpoint_every_steps"):
    if int(config[key]) <= 0:
      raise ValueError(f"config key {key}={config[key]} must be positive")
  for key in ("batch_size", "eval_batch_size"):
    if int(config[key]) % num_devices:
      raise ValueError(f"config key {key}={config[key]} must be divisible by the "
                       f"{num_devices} devices of the mesh (it is the global batch)")
  ckpt_lib.compute_dtype(config)
  if _is_classifier(config) and not config.model.get("num_classes", 1) == 1:
    raise ValueError("config key model.num_classes must be 1: the classifier predicts "
                     "nerve presence")


def _model_fn(config: ml_collections.ConfigDict) -> Callable[[], nnx.Module]:
  from nerveseg_jax import models  # pylint: disable=g-import-not-at-top
  dtype = ckpt_lib.compute_dtype(config)
  return lambda: models.build_model(config.model, dtype=dtype,
                                    rngs=nnx.Rngs(int(config.seed)))


def _to_state(template: nnx.State, pure: Any) -> nnx.State:
  """A pure dict of arrays back into the nnx.State layout of `template` (same key order)."""
  return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(pure))


def _rng_tags(rng_state: nnx.State) -> list[str]:
  tags = set()
  for _, var in nnx.to_flat_state(rng_state):
    tag = getattr(var, "tag", None)
    if tag:
      tags.add(tag)
  return sorted(tags)


@dataclasses.dataclass
class ModelParts:
  """The static pieces for rebuilding the model inside jitted functions."""
  graphdef: Any
  rng_template: nnx.State
  params_template: nnx.State
  rest_template: nnx.State
  rng_tags: list[str]

  def merge(self, params: Any, rest: Any, key: jax.Array | None) -> nnx.Module:
    rngs = jax.tree.map(ckpt_lib._concrete_rng_leaf, self.rng_template)  # pylint: disable=protected-access
    model = nnx.merge(self.graphdef, rngs, _to_state(self.params_template, params),
                      _to_state(self.rest_template, rest))
    if key is not None and self.rng_tags:
      # Dropout noise from (seed, step) only: independent of device count and resume.
      nnx.reseed(model, **{t: jax.random.fold_in(key, i) for i, t in enumerate(self.rng_tags)})
    return model

  def rest_of(self, model: nnx.Module) -> Any:
    _, _, _, rest = nnx.split(model, nnx.RngState, nnx.Param, ...)
    return rest.to_pure_dict()


def model_parts(config: ml_collections.ConfigDict) -> ModelParts:
  abstract = nnx.eval_shape(_model_fn(config))
  graphdef, rng, params, rest = nnx.split(abstract, nnx.RngState, nnx.Param, ...)
  return ModelParts(graphdef, rng, params, rest, _rng_tags(rng))


def abstract_state(config, tx, mesh) -> tuple[Callable[[], Any], Any, Any]:
  """(init_fn, abstract state with shardings, shardings) of the train state."""
  build = _model_fn(config)

  def init():
    model = build()
    _, _, params, rest = nnx.split(model, nnx.RngState, nnx.Param, ...)
    params = params.to_pure_dict()
    return {"params": params, "rest": rest.to_pure_dict(), "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(mesh, abstract)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  return init, abstract, shardings


def init_state(config, parts: ModelParts, tx, mesh) -> tuple[Any, Any]:
  """The train state created directly into its shardings; returns (state, shardings)."""
  del parts  # the state's layout comes from the same model function
  init, _, shardings = abstract_state(config, tx, mesh)
  lowered = jax.jit(init, out_shardings=shardings).lower()
  # The init runs once; on CPU, LLVM's optimisation of the truncated-normal initialisers
  # costs ~4x the compile time of everything else here, for nothing.
  options = {"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu" \
      else None
  return lowered.compile(compiler_options=options)(), shardings


def apply_init_from(config, state, shardings) -> Any:
  """Overwrites params/rest with the arrays of config.init_from that fit (by key)."""
  full = {"params": state["params"], "rest": state["rest"]}
  expected = ckpt_lib.merge_nested(full["params"], full["rest"])
  found = ckpt_lib.load_init_from(config.init_from, expected)

  def one(subtree, subshard):
    flat, treedef = jax.tree_util.tree_flatten_with_path(subtree)
    shard_leaves = jax.tree.leaves(subshard)
    out = []
    for (path, leaf), shard in zip(flat, shard_leaves):
      value = found.get(ckpt_lib.path_str(path))
      out.append(leaf if value is None else jax.make_array_from_callback(
          value.shape, shard, lambda idx, v=value: v[idx]))
    return jax.tree_util.tree_unflatten(treedef, out)

  state = dict(state)
  state["params"] = one(state["params"], shardings["params"])
  state["rest"] = one(state["rest"], shardings["rest"])
  return state


# ----------------------------------------------------------------------------- steps


def make_train_step(config, parts: ModelParts, tx, schedule):
  """(state, health, batch) -> (state, health, TrainMetrics, extras)."""
  classifier = _is_classifier(config)
  aug_cfg = config.data.augment
  loss_cfg = None if classifier else dict(config.loss)
  seed = int(config.seed)
  from nerveseg_jax.data import augment  # pylint: disable=g-import-not-at-top

  def step_fn(state, health, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(seed), step)
    aug_key, drop_key = jax.random.split(key)
    batch = {k: batch[k] for k in _BATCH_KEYS}
    if aug_cfg.enabled:
      batch["image"], batch["mask"] = augment.augment(aug_key, batch["image"], batch["mask"],
                                                      aug_cfg)

    def loss_fn(params):
      model = parts.merge(params, state["rest"], drop_key)
      model.train()
      outputs = model(batch["image"])
      if classifier:
        loss, aux = losses.presence_loss(outputs, batch)
      else:
        loss, aux = losses.seg_loss(outputs, batch, loss_cfg)
      return loss, (aux, outputs, parts.rest_of(model))

    (loss, (aux, outputs, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing; the host sees `health` and stops the run.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = {"params": keep(params, state["params"]), "rest": keep(rest, state["rest"]),
                 "opt_state": keep(opt_state, state["opt_state"]), "step": step + 1}
    first_bad = health[0] < 0
    health = jnp.where(ok | ~first_bad, health,
                       jnp.stack([step.astype(jnp.float32), loss.astype(jnp.float32)]))
    if classifier:
      per_ex = metrics_lib.classifier_outputs(outputs, batch)
      m = metrics_lib.ClassifierTrainMetrics.single_from_model_output(loss=loss, **per_ex)
    else:
      per_ex = metrics_lib.seg_outputs(outputs[0], outputs[1], batch)
      m = metrics_lib.TrainMetrics.single_from_model_output(loss=loss, **per_ex)
    extras = {"grad_norm": grad_norm, "learning_rate": schedule(step)}
    return new_state, health, m, extras

  return step_fn


def jit_train_step(config, parts: ModelParts, tx, schedule, mesh, shardings):
  """The train step jitted with explicit shardings; the state and health are donated.

  Shared by train_and_evaluate and the benchmark, so both measure the same program.
  """
  repl = sharding.replicated(mesh)
  batch_shardings = {"image": sharding.batch_sharding(mesh, 4),
                     "mask": sharding.batch_sharding(mesh, 4),
                     "has_nerve": sharding.batch_sharding(mesh, 1)}
  return jax.jit(make_train_step(config, parts, tx, schedule),
                 in_shardings=(shardings, repl, batch_shardings),
                 out_shardings=(shardings, repl, repl, repl), donate_argnums=(0, 1))


def initial_health(mesh) -> jax.Array:
  """(first bad step, its loss); -1 while every step was finite."""
  return jax.device_put(jnp.array([-1.0, 0.0], jnp.float32), sharding.replicated(mesh))


def make_eval_step(config, parts: ModelParts):
  classifier = _is_classifier(config)
  loss_cfg = None if classifier else dict(config.loss)

  def eval_fn(state, batch):
    model = parts.merge(state["params"], state["rest"], None)
    model.eval()
    valid = batch["valid"]
    b = {k: batch[k] for k in _BATCH_KEYS}
    outputs = model(b["image"])
    if classifier:
      per_ex = metrics_lib.classifier_outputs(outputs, b)
      per_ex["loss"] = optax.sigmoid_binary_cross_entropy(
          outputs.reshape(-1).astype(jnp.float32), b["has_nerve"])
      return metrics_lib.ClassifierEvalMetrics.single_from_model_output(valid=valid, **per_ex)
    per_ex = metrics_lib.seg_outputs(outputs[0], outputs[1], b)
    # Per-example loss so padding is masked out exactly.
    per_ex["loss"] = jax.vmap(lambda o0, o1, bb: losses.seg_loss(
        (o0[None], None if o1 is None else o1[None]),
        {k: v[None] for k, v in bb.items()}, loss_cfg)[0])(outputs[0], outputs[1], b)
    valid_nerve = valid & (b["has_nerve"] > 0.5)
    return metrics_lib.EvalMetrics.single_from_model_output(
        valid=valid, valid_nerve=valid_nerve, **per_ex)

  return eval_fn


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
          "model": ckpt_lib.config_to_dict(config)["model"], "best_metric": best_metric,
          "metrics": dict(metrics or {})}


VAL_HISTORY_FILE = "val_history.jsonl"


def _append_val_history(workdir, step: int, values: Mapping[str, float]) -> None:
  """One JSON line per evaluation in WORKDIR/val_history.jsonl (plain, no TF to read it).

  Rewritten whole (small) rather than appended: object stores have no append. After a
  SIGKILL and resume, steps past the restored checkpoint are evaluated again and appear
  twice; readers keep the last line of each step (see read_val_history).
  """
  path = workdir / VAL_HISTORY_FILE
  old = path.read_text() if path.exists() else ""
  row = {"step": int(step), **{k: (float(v) if np.isfinite(v) else None)
                               for k, v in values.items()}}
  tmp = workdir / (VAL_HISTORY_FILE + ".tmp")
  tmp.write_text(old + json.dumps(row) + "\n")
  tmp.replace(path)


def read_val_history(workdir) -> list[dict[str, Any]]:
  """WORKDIR's evaluations, one per step (the last written wins), in step order."""
  path = ckpt_lib.as_path(workdir) / VAL_HISTORY_FILE
  if not path.exists():
    return []
  by_step = {}
  for line in path.read_text().splitlines():
    if line.strip():
      row = json.loads(line)
      by_step[int(row["step"])] = row
  return [by_step[k] for k in sorted(by_step)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, Any]:
  """Trains (resuming from WORKDIR/checkpoints if any) and returns the final metrics."""
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  workdir = ckpt_lib.as_path(workdir)
  mesh = sharding.make_mesh(config.mesh)
  validate_config(config, mesh.size)
  classifier = _is_classifier(config)
  best_metric = "presence_accuracy" if classifier else "kaggle_score"

  # The model check comes first, and config.json and the event files are written only
  # once the train state is built or restored: a workdir that does not fit (another
  # model, a config.json gone missing) is left exactly as it was.
  ckpt_lib.check_model_config(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=int(config.keep_checkpoints),
                                            best_metric=best_metric)

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
    tx, schedule = make_optimizer(config)
    parts = model_parts(config)
    if start is not None:
      # Restored straight into the shardings: no random init to compile on resume.
      _, abstract, shardings = abstract_state(config, tx, mesh)
      state, meta = checkpointer.restore(start, abstract)
      if int(meta.get("seed", config.seed)) != int(config.seed):
        logging.warning("config key seed=%s differs from the checkpoint's seed=%s: the run "
                        "continues with a different data order", config.seed, meta["seed"])
      data_step = int(meta.get("data_step", start))
      logging.info("resumed from %s step %d", checkpointer.directory, start)
    else:
      start = 0
      state, shardings = init_state(config, parts, tx, mesh)
      if config.init_from:
        state = apply_init_from(config, state, shardings)
      data_step = 0
    start = int(start)
    if jax.process_index() == 0:
      (workdir / ckpt_lib.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")
    writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0)

    # The data-iterator position saved with the checkpoint (one global batch per step).
    train_iter = pipeline.TrainIterator(train_arrays, int(config.batch_size), mesh,
                                        seed=int(config.seed), start_step=data_step)

    jit_step = jit_train_step(config, parts, tx, schedule, mesh, shardings)
    health = initial_health(mesh)

    first = next(train_iter)
    batch_abstract = {k: jax.ShapeDtypeStruct(first[k].shape, first[k].dtype,
                                              sharding=first[k].sharding) for k in _BATCH_KEYS}
    t0 = time.perf_counter()
    compiled = jit_step.lower(state, health, batch_abstract).compile()
    compile_s = time.perf_counter() - t0
    _log_compiled("train_step", compiled, compile_s, writer)
    eval_step = jax.jit(make_eval_step(config, parts))

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
      if jax.process_index() == 0:
        _append_val_history(workdir, step, values)
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
          logging.info("saved checkpoint step %d", step)
        if stop:
          preempted = True
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


def _flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory (default ./runs/<config name>)")
  return flags.FLAGS


def default_workdir(config_arg: str, config: ml_collections.ConfigDict) -> pathlib.Path:
  """./runs/<file stem>[_<variant>], e.g. runs/unet_synthetic for configs/unet.py:synthetic."""
  path, _, variant = config_arg.partition(":")
  name = pathlib.Path(path).stem or str(config.get("name", "run"))
  if variant:
    name += "_" + variant.replace(",", "_")
  return pathlib.Path("runs") / name


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  flags = _flags()
  config = flags.config
  # A string, not pathlib: gs://bucket/run must keep its double slash.
  workdir = flags.workdir or default_workdir(_config_arg(sys.argv), config)
  try:
    result = train_and_evaluate(config, workdir)
  except tfds_source.DataNotFoundError as e:
    raise SystemExit(f"error: {e}") from None
  except (ckpt_lib.CheckpointMismatchError, NonFiniteLossError, ValueError,
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


def _config_arg(argv: list[str]) -> str:
  """The --config value as given on the command line (file[:variant])."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _override_keys(argv: list[str]) -> list[str]:
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _friendly_flag_errors(argv: list[str]) -> list[str]:
  """Parses flags; a bad --config or --config.KEY ends in one message, not a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fl = _flags()
  try:
    return fl(argv)
  except (AttributeError, KeyError) as e:
    # config_flags raises these for an override of a key the config does not have.
    hint = str(e).replace("\\n", "\n")
    hint = hint[hint.index("Did you mean"):].strip("\"' ") if "Did you mean" in hint else ""
    cfg = fl["config"].value
    unknown = [k for k in _override_keys(argv) if cfg is None or not _has_key(cfg, k)]
    key = unknown[0] if unknown else str(e)
    raise SystemExit(f"error: unknown config key {key!r} (--config.{key}=...); "
                     f"{hint}".rstrip("; ")) from None
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    # config_flags embeds the config file's traceback: keep its first and last line.
    msg = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1].strip()}"
    raise SystemExit(f"error: {msg}") from None


def _has_key(cfg: ml_collections.ConfigDict, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      return False
    node = node[part]
  return True


def run() -> None:
  """Console-script entry (`nerveseg-train`)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.INFO)
  app.run(main, flags_parser=_friendly_flag_errors)


if __name__ == "__main__":
  run()
