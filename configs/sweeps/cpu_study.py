"""The noise-controlled study on real frames behind the `cpu` variant (docs/study.md).

Command (2-core CPU; each setting is trained on folds 0 and 1 of the 5-fold
subject-wise split, so every difference is paired by fold; re-running resumes):
  python -m nerveseg_jax.sweep --config configs/unet.py:folder,cpu \
      --sweep configs/sweeps/cpu_study.py --folds 5 --fold_ids 0,1 \
      --workdir runs/cpu_study --config.data.manual_dir=PATH/nerve_real_subset
  -> runs/cpu_study/sweep.md: per setting, mean ± sd over the folds of the nerve-frame
     Dice at the frames' own size (uncalibrated, and calibrated out of fold), its
     paired difference from `base`, and whether that difference clears its noise
     (twice its standard error, and the seed-to-seed difference of `seed1`).

Settings change one thing each from the `cpu` recipe, at a screening schedule of 400
steps (a setting that wins here is then confirmed at the full schedule). They are
ordered by what they are expected to decide, so an interrupted study has the
likeliest levers first. `steps_2x` is the schedule factor: 800 against 400 steps.
"""

STRONG_AUGMENT = {
    "data.augment.rotate_deg": 20.0, "data.augment.scale": 0.2,
    "data.augment.translate": 0.1, "data.augment.gamma": 0.4,
    "data.augment.contrast": 0.3, "data.augment.brightness": 0.2,
    "data.augment.speckle": 0.15,
}


def get_sweep(arg: str = "") -> dict:
  """ARG: optional comma-separated setting names, to train only those (in that order),
  e.g. to share the settings between two processes on one machine."""
  base = {
      "num_train_steps": 400,
      "warmup_steps": 25,
      "eval_every_steps": 400,
      "checkpoint_every_steps": 400,
  }
  runs = [
      {"name": "base"},
      {"name": "seed1", "seed": 1},
      {"name": "steps_2x", "num_train_steps": 800, "eval_every_steps": 800,
       "checkpoint_every_steps": 800},
      {"name": "res_128", "data.image_size": (128, 128)},
      {"name": "focal_dice", "loss.bce": 0.0, "loss.focal": 1.0},
      {"name": "augment_off", "data.augment.enabled": False},
      {"name": "residual", "model.block": "residual"},
      {"name": "deep_supervision", "model.deep_supervision": True, "loss.deep": 0.5},
      {"name": "augment_strong", **STRONG_AUGMENT},
      {"name": "width_32", "model.features": 32},
      {"name": "res_160", "data.image_size": (160, 160)},
  ]
  if arg:
    by_name = {r["name"]: r for r in runs}
    unknown = [n for n in arg.split(",") if n not in by_name]
    if unknown:
      raise ValueError(f"cpu_study: unknown setting(s) {unknown}; known: {list(by_name)}")
    runs = [by_name[n] for n in arg.split(",")]
  return {"base": base, "runs": runs, "noise_run": "seed1"}
