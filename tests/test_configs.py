"""Configs load, keep the stable keys, and the CLI rejects bad keys with one clear line."""

import subprocess
import sys

import pytest

from nerveseg_jax import cli
from nerveseg_jax.configs import classifier, unet

STABLE = ("data.source", "data.manual_dir", "data.data_dir", "data.image_size",
          "data.num_folds", "data.fold", "batch_size", "num_train_steps", "learning_rate",
          "seed", "mesh.data", "mesh.fsdp", "checkpoint_every_steps", "eval_every_steps",
          "init_from", "model.name")


@pytest.mark.parametrize("module,arg", [(unet, ""), (unet, "synthetic"), (unet, "smoke"),
                                        (unet, "folder"), (unet, "folder,cpu"),
                                        (classifier, ""),
                                        (classifier, "synthetic"), (classifier, "smoke")])
def test_configs_have_stable_keys(module, arg):
  c = module.get_config(arg)
  for key in STABLE:
    assert cli.has_key(c, key), key
  assert c.batch_size % 8 == 0 and c.eval_batch_size % 8 == 0  # fits 8 fake devices
  if arg in ("synthetic", "smoke"):
    assert c.data.source == "synthetic"


def test_classifier_defaults():
  c = classifier.get_config()
  assert c.model.name == "inception_resnet_v2" and c.model.num_classes == 1
  assert c.model.in_channels == 1 and tuple(c.data.image_size) == (299, 299)


@pytest.mark.parametrize("module", [unet, classifier])
def test_unknown_variant(module):
  with pytest.raises(ValueError, match="unknown variant 'nope'"):
    module.get_config("nope")


def test_default_workdir():
  c = unet.get_config("synthetic")
  assert str(cli.default_workdir("configs/unet.py:synthetic", c)) == "runs/unet_synthetic"
  assert str(cli.default_workdir("configs/classifier.py", c)) == "runs/classifier"


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "nerveseg_jax.train", *args],
                        capture_output=True, text=True, timeout=120)


def test_cli_bad_keys_give_one_clear_line(tmp_path):
  r = _cli("--config", "configs/unet.py:smoke", "--config.model.featurs=3",
           f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert "unknown config key 'model.featurs'" in r.stderr
  assert "did you mean model.features?" in r.stderr
  assert "Traceback" not in r.stderr
  r = _cli("--config", "configs/unet.py:smok", f"--workdir={tmp_path}")
  assert r.returncode != 0 and "unknown variant 'smok'" in r.stderr
  assert "Traceback" not in r.stderr
  assert not any(tmp_path.iterdir())  # nothing was written


def test_model_defaults_come_from_the_models_package():
  from nerveseg_jax import models
  from nerveseg_jax.configs import classifier, common, unet
  c = unet.get_config()
  for key, default in models.MODEL_KEYS["unet"].items():
    if key != "in_channels":
      assert c.model[key] == default, key
  assert classifier.get_config().model.dropout == 0.2  # an override of the default
  with pytest.raises(ValueError, match="has no key"):
    common.model_config("unet", featurez=8)


def test_variants_compose_in_order():
  from nerveseg_jax.configs import unet
  c = unet.get_config("smoke,folder")
  assert c.data.source == "folder" and c.model.features == 4
  assert unet.get_config("folder,smoke").data.source == "synthetic"


def test_cpu_variant_composes_with_folder():
  c = unet.get_config("folder,cpu")
  assert c.data.source == "folder" and tuple(c.data.image_size) == (96, 96)
  assert (c.model.features, c.num_train_steps, c.batch_size) == (16, 1800, 16)
  # Only sizes and schedule: the model family and the losses are the default's.
  default = unet.get_config("folder")
  assert c.model.block == default.model.block and c.loss.to_dict() == default.loss.to_dict()
