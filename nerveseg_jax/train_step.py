"""The jitted train and eval steps, shared by train (the loop) and benchmark.

Everything random in a step comes from (seed, step): augmentation and dropout noise do
not depend on the device count, and a resumed run repeats the same steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nerveseg_jax import losses
from nerveseg_jax import metrics as metrics_lib
from nerveseg_jax import sharding
from nerveseg_jax import train_state

BATCH_KEYS = ("image", "mask", "has_nerve")


def make_train_step(config, parts: train_state.ModelParts, tx, schedule):
  """(state, health, batch) -> (state, health, TrainMetrics, extras)."""
  classifier = train_state.is_classifier(config)
  aug_cfg = config.data.augment
  loss_cfg = None if classifier else dict(config.loss)
  seed = int(config.seed)
  from nerveseg_jax.data import augment  # pylint: disable=g-import-not-at-top

  def step_fn(state, health, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(seed), step)
    aug_key, drop_key = jax.random.split(key)
    batch = {k: batch[k] for k in BATCH_KEYS}
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


def jit_train_step(config, parts: train_state.ModelParts, tx, schedule, mesh, shardings):
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


def make_eval_step(config, parts: train_state.ModelParts):
  classifier = train_state.is_classifier(config)
  loss_cfg = None if classifier else dict(config.loss)

  def eval_fn(state, batch):
    model = parts.merge(state["params"], state["rest"], None)
    model.eval()
    valid = batch["valid"]
    b = {k: batch[k] for k in BATCH_KEYS}
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
