"""Weights from disk into a model: a run's checkpoint for inference, or init_from.

  load_model(workdir, which)        the model of WORKDIR/config.json with the weights of
                                    its best (or latest) checkpoint, in eval mode
  load_init_from(path, expected)    the arrays of a converted (or training) checkpoint
                                    that fit a new model, by key

Both read arrays as numpy on every host (no shardings, no optimizer state); training's
own resume is TrainCheckpointer.restore (nerveseg_jax.checkpoint).
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from nerveseg_jax import checkpoint
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.checkpoint import check_shapes, flat_by_path, path_str
from nerveseg_jax.workdir import CHECKPOINT_DIR, CheckpointMismatchError, as_path

log = logging.getLogger(__name__)


def tree_metadata(path: pathlib.Path) -> dict[str, Any]:
  """The array metadata tree (shapes, dtypes) of a PyTree checkpoint directory.

  Read by the handler, not a Checkpointer: Checkpointer.metadata also looks for the
  step's _CHECKPOINT_METADATA in PATH, and a training checkpoint's item (STEP/state)
  has none (the manager writes it in STEP), so every load warned "Metadata file does
  not exist", as if the checkpoint were damaged.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(path))
  finally:
    handler.close()
  meta = getattr(meta, "item_metadata", meta)
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


def unflatten_like(expected: Any, flat: Mapping[str, Any], where: str) -> Any:
  """The values of `flat` (by path) in the structure of `expected`."""
  paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
  missing = [p for p in paths if p not in flat]
  if missing:
    raise CheckpointMismatchError(f"{where} lacks {missing[:5]}")
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected),
                                      [flat[p] for p in paths])


def merge_nested(a: Mapping, b: Mapping) -> dict:
  """Two nested dicts as one (params and non-parameter state of a model, by key)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_nested(out[k], v) if k in out and isinstance(v, Mapping) else v
  return out


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


def load_model(workdir: str | pathlib.Path, *, which: str = "best"
               ) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """Rebuilds the model of WORKDIR/config.json and restores its weights (eval mode).

  which='best' takes the checkpoint with the best validation score (the latest when
  no checkpoint was scored); 'latest' the last one saved (checkpoint.select_step).
  """
  from nerveseg_jax import models  # pylint: disable=g-import-not-at-top

  workdir = as_path(workdir)
  config = workdir_lib.read_config(workdir)
  step = checkpoint.select_step(workdir, which)
  m = models.abstract_split(config, seed=0)
  graphdef, rng_state, params, rest = m.graphdef, m.rng, m.params, m.rest
  expected = {"params": params.to_pure_dict(), "rest": rest.to_pure_dict()}
  path = workdir / CHECKPOINT_DIR / str(step) / "state"
  saved = tree_metadata(path)
  check_shapes({k: saved.get(k, {}) for k in expected}, expected, str(path))
  restored = _numpy_restore(path, keys=tuple(expected))
  rngs = jax.tree.map(concrete_rng_leaf, rng_state)
  flat = flat_by_path(restored)
  for name, part in (("params", params), ("rest", rest)):
    sub = {k[len(name) + 1:]: jax.numpy.asarray(v) for k, v in flat.items()
           if k.startswith(name + "/")}
    part.replace_by_pure_dict(unflatten_like(part.to_pure_dict(), sub, str(path)))
  model = nnx.merge(graphdef, rngs, params, rest)
  model.eval()
  log.info("loaded %s step %d (%s)", workdir, step, which)
  return config, model


def concrete_rng_leaf(s: Any) -> Any:
  """A concrete value for an abstract RNG variable (keys are reseeded where it matters)."""
  if jax.numpy.issubdtype(s.dtype, jax.dtypes.prng_key):
    return jax.random.key(0) if not s.shape else jax.random.split(jax.random.key(0), s.shape)
  return jax.numpy.zeros(s.shape, s.dtype)
