"""InceptionResNetV2 nerve-presence classifier (is there a nerve in this frame?).

Command (real data, after the Kaggle download and `python -m nerveseg_jax.convert_keras`):
  python -m nerveseg_jax.train --config configs/classifier.py \
      --config.data.manual_dir=~/kaggle/ultrasound-nerve-segmentation.zip \
      --config.init_from=~/irv2_imagenet_notop

Variants, chosen with configs/classifier.py:VARIANT
  synthetic  the embedded synthetic set at 75x75 (the smallest input IRv2 accepts).
  smoke      a few steps at 75x75 for tests.
`init_from` takes the Orbax checkpoint written by convert_keras (ImageNet weights,
no top): the backbone is restored by key, the 1-logit head starts at init, and the
RGB stem kernel is summed to the 1 gray input channel.
Expected result: presence accuracy on the validation fold is reported as
val/presence_accuracy; the synthetic variant is a plumbing check, not a benchmark.
"""

import ml_collections

from nerveseg_jax.configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = common.base_config()
  c.name = "classifier"
  c.model = ml_collections.ConfigDict(dict(
      name="inception_resnet_v2",
      num_classes=1,
      in_channels=1,
      dropout=0.2,
  ))
  c.data.image_size = (299, 299)
  c.batch_size = 32
  c.learning_rate = 3e-4   # fine-tuning an ImageNet backbone wants a gentler step
  c.num_train_steps = 3000
  c.data.augment.speckle = 0.05
  if arg:
    for variant in arg.split(","):
      if variant == "synthetic":
        c.data.source = "synthetic"
        c.data.image_size = (75, 75)
        c.batch_size = 16
        c.eval_batch_size = 32
        c.num_train_steps = 200
        c.warmup_steps = 20
        c.log_every_steps = 20
        c.eval_every_steps = 100
        c.checkpoint_every_steps = 100
      elif variant == "smoke":
        c.data.source = "synthetic"
        c.data.synthetic_subjects = 4
        c.data.synthetic_frames = 12
        c.data.num_folds = 4
        c.data.image_size = (75, 75)
        c.batch_size = 8
        c.eval_batch_size = 8
        c.num_train_steps = 4
        c.warmup_steps = 1
        c.log_every_steps = 2
        c.eval_every_steps = 4
        c.checkpoint_every_steps = 4
      elif variant == "folder":
        c.data.source = "folder"
      else:
        raise ValueError(f"configs/classifier.py: unknown variant {variant!r}; "
                         "known: synthetic, smoke, folder")
  return c
