"""The train state: optimizer, config checks, and the state created into its shardings.

The state is a pytree of arrays, {"params", "rest" (the model's other state, e.g. batch
statistics), "opt_state", "step"}; ModelParts rebuilds the NNX model from it inside
jitted functions. `setup` makes all of it in one call, fresh or resumed; train (the
loop) and benchmark (the same programs) both start there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from nerveseg_jax import checkpoint as ckpt_lib
from nerveseg_jax import loading
from nerveseg_jax import models
from nerveseg_jax import sharding

log = logging.getLogger(__name__)

is_classifier = models.is_classifier


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
  models.compute_dtype(config)
  if is_classifier(config) and not config.model.get("num_classes", 1) == 1:
    raise ValueError("config key model.num_classes must be 1: the classifier predicts "
                     "nerve presence")


def _model_fn(config: ml_collections.ConfigDict) -> Callable[[], nnx.Module]:
  dtype = models.compute_dtype(config)
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
    rngs = jax.tree.map(loading.concrete_rng_leaf, self.rng_template)
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
  m = models.abstract_split(config)
  return ModelParts(m.graphdef, m.rng, m.params, m.rest, _rng_tags(m.rng))


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


def init_state(config, tx, mesh) -> tuple[Any, Any]:
  """The train state created directly into its shardings; returns (state, shardings)."""
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
  expected = loading.merge_nested(full["params"], full["rest"])
  found = loading.load_init_from(config.init_from, expected)

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


@dataclasses.dataclass
class Setup:
  """Everything a training loop starts from."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  parts: ModelParts
  state: Any
  shardings: Any
  start_step: int  # the step the state is at (0 when fresh); also the data position
  resumed: bool


def setup(config: ml_collections.ConfigDict, mesh, checkpointer=None) -> Setup:
  """Optimizer, model parts and the state in its shardings: restored from the latest
  checkpoint of `checkpointer` when there is one, else initialised (and init_from)."""
  tx, schedule = make_optimizer(config)
  parts = model_parts(config)
  start = checkpointer.latest_step() if checkpointer is not None else None
  if start is not None:
    # Restored straight into the shardings: no random init to compile on resume.
    _, abstract, shardings = abstract_state(config, tx, mesh)
    state, meta = checkpointer.restore(start, abstract)
    if int(meta.get("seed", config.seed)) != int(config.seed):
      log.warning("config key seed=%s differs from the checkpoint's seed=%s: the run "
                      "continues with a different data order", config.seed, meta["seed"])
    return Setup(tx, schedule, parts, state, shardings, int(start), True)
  state, shardings = init_state(config, tx, mesh)
  if config.init_from:
    state = apply_init_from(config, state, shardings)
  return Setup(tx, schedule, parts, state, shardings, 0, False)
