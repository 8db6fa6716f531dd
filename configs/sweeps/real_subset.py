"""The real-frame sweep that chose the U-Net defaults (README, "Results").

Command (2-core CPU: about 90 minutes for all runs; the table is rewritten after
each run, and re-running the command skips finished runs):
  python -m nerveseg_jax.sweep --config configs/unet.py:folder \
      --sweep configs/sweeps/real_subset.py \
      --config.data.manual_dir=PATH/nerve_real_subset --evaluate
  -> runs/sweep_real_subset/sweep.md: validation Dice on nerve frames (fold 0 of 5, by
     subject) of each run at steps 100..500, and at the frames' own size, ranked.
     Measured 2026-12-03: base 0.660 (0.698 with seed 1), lr 3e-3 0.676, 64x64 0.655,
     Dice x3 0.653, lr 3e-4 0.649, no augmentation 0.644, 8 features 0.596, BCE only
     0.000. What that decided for the defaults: README, "Real frames".

The base is the README's real-frame run (96x96, 16 base features, 500 steps); each
other run changes one thing from it (one factor at a time), and `seed1` repeats the base
with another seed to show how much of a difference is noise. Every frame of
nerve_real_subset has a nerve, so this ranks mask outlines; the nerve-or-not decision
(presence loss weight, thresholds) needs the full Kaggle set with its empty frames.
"""


def get_sweep(arg: str = "") -> dict:
  del arg
  base = {
      "data.image_size": (96, 96),
      "model.features": 16,
      "batch_size": 16,
      "eval_batch_size": 32,
      "num_train_steps": 500,
      "warmup_steps": 25,
      "log_every_steps": 50,
      "eval_every_steps": 100,
      "checkpoint_every_steps": 500,
      "keep_checkpoints": 1,
  }
  # Ordered by what a run costs and what it decides. Resolution 128x128 was measured
  # with the same base earlier (README). A width_32 run ({"model.features": 32}) costs
  # about four base runs on a 2-core CPU and is left out.
  runs = [
      {"name": "base"},
      {"name": "seed1", "seed": 1},
      {"name": "no_augment", "data.augment.enabled": False},
      {"name": "bce_only", "loss.dice": 0.0},
      {"name": "dice_x3", "loss.dice": 3.0},
      {"name": "lr_3e-3", "learning_rate": 3e-3},
      {"name": "lr_3e-4", "learning_rate": 3e-4},
      {"name": "res_64", "data.image_size": (64, 64)},
      {"name": "width_8", "model.features": 8},
  ]
  return {"base": base, "runs": runs, "metric": "nerve_dice"}
