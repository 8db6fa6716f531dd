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


def _synthetic(c: ml_collections.ConfigDict) -> None:
  common.synthetic_demo(c, image_size=(75, 75), steps=200)  # the smallest input IRv2 takes


def _smoke(c: ml_collections.ConfigDict) -> None:
  common.smoke(c, image_size=(75, 75), steps=4, warmup=1, log_every=2, every=4)
  c.model.blocks = (1, 2, 1)  # the same network, shallower: compiles in a fraction


VARIANTS = {"synthetic": _synthetic, "smoke": _smoke, "folder": common.folder}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = common.base_config()
  c.name = "classifier"
  c.model = common.model_config("inception_resnet_v2", omit=("include_top",), dropout=0.2)
  c.data.image_size = (299, 299)
  c.batch_size = 32
  c.learning_rate = 3e-4   # fine-tuning an ImageNet backbone wants a gentler step
  c.num_train_steps = 3000
  c.data.augment.speckle = 0.05
  return common.apply_variants(c, arg, VARIANTS, "configs/classifier.py")
