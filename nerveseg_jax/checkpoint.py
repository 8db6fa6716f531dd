"""Orbax checkpoints in WORKDIR/checkpoints: save policy, resume, best-by-score, loading.

Each step directory holds two items: ``state`` (StandardSave of the train state:
params, non-parameter model state such as BatchNorm statistics, optimizer state,
step) and ``meta`` (JsonSave: step, seed, data-iterator position, model config,
metrics). The per-step RNG is fold_in(seed, step), so (seed, step) restores it.
Orbax writes into a temporary directory and renames it on success, so a run killed
mid-save leaves no step directory that a resume would pick up.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocm

from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.workdir import CHECKPOINT_DIR, CheckpointMismatchError, as_path

log = logging.getLogger(__name__)


def _metric_or_neg_inf(metrics: Mapping[str, Any], key: str) -> float:
  value = metrics.get(key) if metrics else None
  if value is None or not math.isfinite(float(value)):
    return -math.inf
  return float(value)


def path_str(keypath: tuple) -> str:
  """'a/0/kernel' for a pytree key path (Orbax stores list indices as strings)."""
  parts = []
  for k in keypath:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def flat_by_path(tree: Any) -> dict[str, Any]:
  return {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_like(expected: Any, flat: Mapping[str, Any], where: str) -> Any:
  """The values of `flat` (by path) in the structure of `expected`."""
  paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
  missing = [p for p in paths if p not in flat]
  if missing:
    raise CheckpointMismatchError(f"{where} lacks {missing[:5]}")
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected),
                                      [flat[p] for p in paths])


def check_shapes(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
  """Compares shape trees (leaves: objects with .shape); names every key that differs."""
  flat_saved = {k: tuple(v.shape) for k, v in flat_by_path(saved).items()}
  flat_exp = {k: tuple(v.shape) for k, v in flat_by_path(expected).items()}
  problems = []
  for k in sorted(set(flat_saved) | set(flat_exp)):
    a, b = flat_saved.get(k), flat_exp.get(k)
    if a != b:
      problems.append(f"{k}: checkpoint {a if a is not None else 'missing'} vs model "
                      f"{b if b is not None else 'missing'}")
  if problems:
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    raise CheckpointMismatchError(f"the model does not match the checkpoint {where}:\n  "
                                  + "\n  ".join(shown))


class TrainCheckpointer:
  """The CheckpointManager of one training run: latest N plus the best by val score.

  Orbax saves in the background; a save counts as done only once its step directory
  is committed. `on_saved(step)` runs then (on the caller's thread: at the next
  `poll`, `save`, `wait` or `close`), and only then is "saved checkpoint step N"
  logged, so neither the log nor anything derived from it runs ahead of the disk.
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int, best_metric: str,
               on_saved: Callable[[int], None] | None = None):
    self.directory = as_path(workdir) / CHECKPOINT_DIR
    self.best_metric = best_metric
    self._on_saved = on_saved
    self._pending: int | None = None
    best = lambda m: _metric_or_neg_inf(m, best_metric)
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=max(1, keep)),
        ocm.BestN(get_metric_fn=best, reverse=False, n=1,
                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=best, best_mode="max",
        # Cleans temporary directories of a save that was killed half-way.
        cleanup_tmp_directories=True, create=True)
    # Handlers named up front so metadata can be read before the first restore.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts saving STEP in the background (after the previous save is confirmed)."""
    self._confirm()
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
        metrics=metrics, force=True)
    self._pending = int(step)

  def poll(self) -> None:
    """Confirms a background save that has finished, without waiting for one that has not."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._confirm()

  def _confirm(self) -> None:
    # Re-raises the error of a failed background save.
    self.manager.wait_until_finished()
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    if not (self.directory / str(step)).exists():
      raise OSError(errno.EIO, "the checkpoint was not committed", str(self.directory / str(step)))
    log.info("saved checkpoint step %d", step)
    if self._on_saved is not None:
      self._on_saved(step)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    saved = self.manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    # Model arrays only: the optimizer state follows them, and its namedtuples come
    # back from metadata as lists, whose key paths would not compare.
    model_keys = ("params", "rest")
    check_shapes({k: saved.get(k, {}) for k in model_keys},
                 {k: abstract_state[k] for k in model_keys}, f"{self.directory / str(step)}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except ValueError as e:
      # Orbax's tree-structure message names the part (e.g. opt_state), not the cause.
      raise CheckpointMismatchError(
          f"the train state of this config does not match the checkpoint "
          f"{self.directory / str(step)} (an optimizer setting such as grad_clip_norm "
          f"changed since it was saved?): {e}") from None
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    """Blocks until the last save is committed (and confirmed)."""
    self._confirm()

  def close(self) -> None:
    try:
      self._confirm()
    finally:
      self.manager.close()


def tree_metadata(path: pathlib.Path) -> dict[str, Any]:
  """The array metadata tree (shapes, dtypes) of a PyTree checkpoint directory.

  Read by the handler, not a Checkpointer: Checkpointer.metadata also looks for the
  step's _CHECKPOINT_METADATA in PATH, and a training checkpoint's item (STEP/state)
  has none (the manager writes it in STEP), so every load warned "Metadata file does
  not exist", as if the checkpoint were damaged.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(as_path(path))
  finally:
    handler.close()
  return getattr(meta, "tree", meta)


def _numpy_restore(path: pathlib.Path, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Restores (a subset of the top-level keys of) a PyTree checkpoint as numpy on every host."""
  ckptr = ocp.PyTreeCheckpointer()
  tree = tree_metadata(path)
  if keys is not None:
    missing = [k for k in keys if k not in tree]
    if missing:
      raise CheckpointMismatchError(f"checkpoint {path} has no item(s) {missing}")
    tree = {k: tree[k] for k in keys}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(
      item=tree, restore_args=restore_args, partial_restore=keys is not None))


def load_init_from(path: str | pathlib.Path, expected: Mapping[str, Any]) -> dict[str, Any]:
  """Weights for `expected` (pure dict of the model state) from a converted checkpoint.

  `path` is what convert_keras writes, or the `state` item of a training checkpoint
  (WORKDIR/checkpoints/STEP/state: its params and batch statistics are used).
  Partial restore by key: keys in both take the checkpoint's value; model keys the
  checkpoint lacks (a new head) keep their initial value; checkpoint keys the model
  lacks (an ImageNet top) are ignored. A kernel with 3 input channels feeding a
  1-channel model is summed over RGB, which keeps the response to gray input.
  Returns {path_str: numpy array} for the keys that were found.
  """
  path = as_path(path)
  if not path.exists():
    raise FileNotFoundError(f"init_from: checkpoint {path} does not exist")
  if not path.is_dir():
    raise CheckpointMismatchError(
        f"init_from={path} is a file, not an Orbax checkpoint directory (a Keras .h5 "
        "file is converted first: python -m nerveseg_jax.convert_keras --h5 FILE --out DIR)")
  if (path / CHECKPOINT_DIR).is_dir():
    raise CheckpointMismatchError(
        f"init_from={path} is a training workdir; name one of its checkpoints instead, "
        f"e.g. {path / CHECKPOINT_DIR / 'STEP' / 'state'}")
  try:
    top = tree_metadata(path)
    # A training checkpoint's state item: its model arrays are under params/ and rest/.
    train_state = isinstance(top, Mapping) and {"params", "rest"} <= set(top)
    raw = _numpy_restore(path, keys=("params", "rest") if train_state else None)
    if train_state:
      raw = merge_nested(raw["params"], raw["rest"])
  except (ValueError, FileNotFoundError, OSError) as e:
    raise CheckpointMismatchError(
        f"init_from={path} is not a readable Orbax checkpoint (convert_keras writes "
        f"one): {e}") from None
  if not isinstance(raw, Mapping):
    raise CheckpointMismatchError(f"init_from={path}: the checkpoint is not a tree of "
                                  "named arrays")
  src = flat_by_path(raw)
  problems = []
  flat_exp = jax.tree_util.tree_flatten_with_path(expected)[0]
  out = {}
  for keypath, want in flat_exp:
    key = path_str(keypath)
    if key not in src:
      continue
    value = np.asarray(src[key])
    shape = tuple(want.shape)
    if (value.shape != shape and value.ndim == 4 and value.shape[2] == 3 and shape[2] == 1
        and value.shape[:2] + value.shape[3:] == shape[:2] + shape[3:]):
      value = value.sum(axis=2, keepdims=True)
    if value.shape != shape:
      problems.append(f"{key}: checkpoint {value.shape} vs model {shape}")
    out[key] = value.astype(want.dtype)
  if problems:
    raise CheckpointMismatchError(
        f"init_from={path}: keys that do not fit the model:\n  " + "\n  ".join(problems))
  if not out:
    raise CheckpointMismatchError(
        f"init_from={path}: no key of the checkpoint matches the model (checkpoint keys "
        f"start {sorted(src)[:3]}, model keys {[path_str(k) for k, _ in flat_exp[:3]]})")
  log.info("init_from %s: %d of %d arrays restored", path, len(out), len(flat_exp))
  return out


def merge_nested(a: Mapping, b: Mapping) -> dict:
  """Two nested dicts as one (params and non-parameter state of a model, by key)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_nested(out[k], v) if k in out and isinstance(v, Mapping) else v
  return out


def select_step(directory: pathlib.Path, which: str) -> int:
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: use 'best' or 'latest'")
  mngr = ocp.CheckpointManager(
      directory, item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(
          read_only=True, best_fn=lambda m: _metric_or_neg_inf(m, "__best__"),
          best_mode="max"))
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}: train first")
  step = None
  if which == "best":
    # The metric that ranks checkpoints is recorded in each step's meta.
    scored = []
    for s in steps:
      meta = json.loads((directory / str(s) / "meta" / "metadata").read_text()) \
          if (directory / str(s) / "meta" / "metadata").exists() else {}
      key = meta.get("best_metric")
      value = (meta.get("metrics") or {}).get(key) if key else None
      if value is not None and math.isfinite(float(value)):
        scored.append((float(value), s))
    if scored:
      step = max(scored)[1]
  if step is None:
    step = max(steps)
  mngr.close()
  return step


def load_model(workdir: str | pathlib.Path, *, which: str = "best"
               ) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """Rebuilds the model of WORKDIR/config.json and restores its weights (eval mode).

  which='best' takes the checkpoint with the best validation score (the latest when
  no checkpoint was scored); 'latest' the last one saved.
  """
  from nerveseg_jax import models  # pylint: disable=g-import-not-at-top

  workdir = as_path(workdir)
  config = workdir_lib.read_config(workdir)
  directory = workdir / CHECKPOINT_DIR
  step = select_step(directory, which)
  m = models.abstract_split(config, seed=0)
  graphdef, rng_state, params, rest = m.graphdef, m.rng, m.params, m.rest
  expected = {"params": params.to_pure_dict(), "rest": rest.to_pure_dict()}
  path = directory / str(step) / "state"
  saved = tree_metadata(path)
  check_shapes({k: saved.get(k, {}) for k in expected}, expected, str(path))
  restored = _numpy_restore(path, keys=tuple(expected))
  rngs = jax.tree.map(_concrete_rng_leaf, rng_state)
  flat = flat_by_path(restored)
  for name, part in (("params", params), ("rest", rest)):
    sub = {k[len(name) + 1:]: jax.numpy.asarray(v) for k, v in flat.items()
           if k.startswith(name + "/")}
    part.replace_by_pure_dict(unflatten_like(part.to_pure_dict(), sub, str(path)))
  model = nnx.merge(graphdef, rngs, params, rest)
  model.eval()
  log.info("loaded %s step %d (%s)", workdir, step, which)
  return config, model


def _concrete_rng_leaf(s: Any) -> Any:
  """A concrete value for an abstract RNG variable (keys are reseeded where it matters)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if jnp.issubdtype(s.dtype, jax.dtypes.prng_key):
    return jax.random.key(0) if not s.shape else jax.random.split(jax.random.key(0), s.shape)
  return jnp.zeros(s.shape, s.dtype)
