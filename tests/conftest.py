"""Test set-up: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# TensorFlow is host-only here; keep it off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  path = SHARED / "data"
  if not path.exists():
    pytest.skip(f"real data folder {path} is not present")
  return path


# The smoke config made just strong enough to find the synthetic nerves (the end-to-end
# test requires beating an all-empty submission): measured val Dice on nerve frames
# 0.90 after 150 steps, 0.0 after 80 (the U-Net first learns to predict empty masks).
SMOKE_STEPS = 150


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> pathlib.Path:
  """Root holding workdir/ (a trained smoke run) and raw/ (its synthetic Kaggle tree).

  Trained once per test session and shared by the inference, evaluate, predict, serve
  and benchmark tests.
  """
  from nerveseg_jax import train
  from nerveseg_jax.configs import unet
  root = tmp_path_factory.mktemp("smoke_run")
  config = unet.get_config("smoke")
  config.data.data_dir = str(root / "tfds")
  config.data.manual_dir = str(root / "raw")
  config.num_train_steps = SMOKE_STEPS
  config.learning_rate = 1e-2
  config.model.features = 8
  config.eval_every_steps = SMOKE_STEPS // 2
  config.checkpoint_every_steps = SMOKE_STEPS // 2
  train.train_and_evaluate(config, root / "workdir")
  return root


@pytest.fixture(scope="session")
def calibrated_run(smoke_run, tmp_path_factory) -> pathlib.Path:
  """A copy of the smoke run's workdir, evaluated and calibrated on its validation fold."""
  import shutil
  from nerveseg_jax import evaluate
  workdir = tmp_path_factory.mktemp("calibrated") / "workdir"
  shutil.copytree(smoke_run / "workdir", workdir)
  assert evaluate.main(["--workdir", str(workdir)]) == 0
  return workdir
