"""Orbax checkpoints in WORKDIR/checkpoints: save policy, resume, best-by-score.

Each step directory holds two items: ``state`` (StandardSave of the train state:
params, non-parameter model state such as BatchNorm statistics, optimizer state,
step) and ``meta`` (JsonSave: step, seed, data-iterator position, model config,
metrics). The per-step RNG is fold_in(seed, step), so (seed, step) restores it.
Orbax writes into a temporary directory and renames it on success, so a run killed
mid-save leaves no step directory that a resume would pick up.

Which step is "best" is Orbax's own choice (best_fn over the validation metrics saved
with each step), the same for the run that keeps checkpoints and for whoever loads
one later (nerveseg_jax.loading).
"""

from __future__ import annotations

import errno
import logging
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from nerveseg_jax.workdir import CHECKPOINT_DIR, CheckpointMismatchError, as_path

log = logging.getLogger(__name__)

_ITEMS = ("state", "meta")
# The validation metric that ranks checkpoints, higher is better: the Kaggle score of a
# segmentation model, else presence accuracy (a classifier's metrics have no Kaggle score).
SCORE_METRICS = ("kaggle_score", "presence_accuracy")


def validation_score(metrics: Mapping[str, Any] | None) -> float:
  """The score that ranks a checkpoint saved with `metrics`; -inf when it was not scored."""
  for key in SCORE_METRICS:
    value = (metrics or {}).get(key)
    if value is not None:
      value = float(value)
      return value if math.isfinite(value) else -math.inf
  return -math.inf


def _options(**kwargs) -> ocp.CheckpointManagerOptions:
  return ocp.CheckpointManagerOptions(best_fn=validation_score, best_mode="max", **kwargs)


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
  """The CheckpointManager of one training run: latest `keep` plus the best by val score.

  Orbax saves in the background; a save counts as done only once its step directory
  is committed. `on_saved(step)` runs then (on the caller's thread: at the next
  `poll`, `save`, `wait` or `close`), and only then is "saved checkpoint step N"
  logged, so neither the log nor anything derived from it runs ahead of the disk.
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int,
               on_saved: Callable[[int], None] | None = None):
    self.directory = as_path(workdir) / CHECKPOINT_DIR
    self._on_saved = on_saved
    self._pending: int | None = None
    # A checkpoint saved without metrics (no validation at that step) is never the
    # best one, so it is kept only while it is among the latest.
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=max(1, keep)),
        ocm.BestN(get_metric_fn=validation_score, reverse=False, n=1,
                  keep_checkpoints_without_metrics=False),
    ])
    # Cleans temporary directories of a save that was killed half-way.
    options = _options(preservation_policy=policy, cleanup_tmp_directories=True, create=True)
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


def select_step(workdir: str | pathlib.Path, which: str) -> int:
  """The step that `which` names in WORKDIR/checkpoints.

  'best': the step with the best validation score (Orbax's best_step, ranked as the
  run ranked them), or the latest when no step was scored; 'latest': the last saved.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: use 'best' or 'latest'")
  directory = as_path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {directory}: train first")
  manager = ocp.CheckpointManager(directory, item_names=_ITEMS,
                                  options=_options(read_only=True))
  try:
    latest = manager.latest_step()
    if latest is None:
      raise FileNotFoundError(f"no checkpoint in {directory}: train first")
    if which == "latest":
      return latest
    best = manager.best_step()
    scored = best is not None and validation_score(manager.metrics(best)) > -math.inf
    return best if scored else latest
  finally:
    manager.close()
