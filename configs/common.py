"""Defaults shared by every config. Each config file's ``get_config(arg)`` starts here.

Keys named in the issues are public interface (README, launchers and outside checks
call them): data.source, data.manual_dir, data.data_dir, data.image_size,
data.num_folds, data.fold, batch_size, num_train_steps, learning_rate, seed, model.*,
mesh.*, checkpoint_every_steps, eval_every_steps, init_from.
"""

from collections.abc import Callable, Mapping

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "kaggle"          # kaggle | folder | synthetic
  # kaggle: the Kaggle zip or its extracted tree. folder: a root with images/ and masks/.
  # synthetic: where the generated Kaggle-layout tree goes ('' = <data_dir>/synthetic_raw).
  d.manual_dir = ""
  d.data_dir = ""              # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  d.image_size = (128, 176)    # (H, W) the network sees; 420x580 keeps its aspect at 128x176
  d.num_folds = 5              # subject-wise K-fold, computed at load time
  d.fold = 0                   # which fold is validation; -1 = train on everything
  d.duplicates = "keep"        # keep | drop | propagate contradictory near-duplicates
  d.synthetic_subjects = 10    # only for source=synthetic
  d.synthetic_frames = 40
  d.synthetic_seed = 0
  d.augment = ml_collections.ConfigDict(dict(
      enabled=True,
      hflip=0.5,               # probability; vertical flips are not physical (depth axis)
      rotate_deg=10.0,
      scale=0.1,               # +-10 %
      translate=0.06,          # fraction of the frame
      gamma=0.25,              # log-uniform in [1/(1+g), 1+g]
      contrast=0.15,
      brightness=0.1,
      speckle=0.08,            # multiplicative noise std
  ))
  return d


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0
  c.batch_size = 32            # global, over all processes and devices
  c.eval_batch_size = 64       # global
  c.num_train_steps = 6000
  c.learning_rate = 1e-3
  c.warmup_steps = 200
  c.weight_decay = 1e-4
  c.grad_clip_norm = 1.0
  c.dtype = "float32"          # compute dtype: float32 | bfloat16 (params stay float32)
  c.data = data_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3       # latest N, plus the best by validation score
  c.init_from = ""             # an Orbax checkpoint dir to start the weights from
  return c


def model_config(name: str, *, omit: tuple[str, ...] = (), **overrides
                 ) -> ml_collections.ConfigDict:
  """model.* for `name`: the defaults and allowed values live in nerveseg_jax.models."""
  from nerveseg_jax import models  # pylint: disable=g-import-not-at-top
  defaults = models.MODEL_KEYS[name]
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(f"model.name={name!r} has no key(s) {unknown}; known: {sorted(defaults)}")
  keys = {k: v for k, v in defaults.items() if k not in omit}
  return ml_collections.ConfigDict({"name": name, **keys, **overrides})


def synthetic_demo(c: ml_collections.ConfigDict, *, image_size: tuple[int, int],
                   steps: int) -> None:
  """The embedded demo set, sized to finish in a few minutes on a 2-core CPU."""
  c.data.source = "synthetic"
  c.data.image_size = image_size
  c.batch_size, c.eval_batch_size = 16, 32
  c.num_train_steps, c.warmup_steps = steps, 20
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 100, 100


def smoke(c: ml_collections.ConfigDict, *, image_size: tuple[int, int], steps: int,
          warmup: int, log_every: int, every: int) -> None:
  """A tiny synthetic set (4 subjects, one held out) for tests; scores mean nothing."""
  c.data.source = "synthetic"
  c.data.synthetic_subjects, c.data.synthetic_frames = 4, 12
  c.data.num_folds = 4
  c.data.image_size = image_size
  c.batch_size, c.eval_batch_size = 8, 8
  c.num_train_steps, c.warmup_steps = steps, warmup
  c.log_every_steps = log_every
  c.eval_every_steps = c.checkpoint_every_steps = every


def folder(c: ml_collections.ConfigDict) -> None:
  """A user's own images/ + masks/ folder (set data.manual_dir)."""
  c.data.source = "folder"


def apply_variants(c: ml_collections.ConfigDict, arg: str,
                   variants: Mapping[str, Callable[[ml_collections.ConfigDict], None]],
                   where: str) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants of `arg` in order (`file.py:a,b`)."""
  for variant in filter(None, (v.strip() for v in arg.split(","))):
    if variant not in variants:
      raise ValueError(f"{where}: unknown variant {variant!r}; known: {', '.join(variants)}")
    variants[variant](c)
  return c
