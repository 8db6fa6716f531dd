"""configs/classifier.py trained from a converted ImageNet checkpoint (init_from).

Its own file so that pytest-xdist (loadfile) runs this, the suite's longest test (an
Inception-ResNetV2 init and train step compiled on CPU), beside test_train's others.
"""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from nerveseg_jax import checkpoint, loading
from test_train import REPO, SUBPROCESS_ENV, run_result, smoke_data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return smoke_data_dir(tmp_path_factory)


@pytest.mark.slow
def test_classifier_trains_from_a_converted_checkpoint(data_dir, tmp_path):
  """configs/classifier.py:smoke with --config.init_from=DIR, DIR as convert_keras writes it.

  learning_rate=0 leaves the parameters where init_from put them, so the trained
  workdir shows what was loaded: the RGB stem summed to gray, every backbone array by
  key, and the 1-logit head (absent from the file) at its initial value. The smoke
  variant is the same network with fewer repeated blocks (model.blocks), so it takes
  the published network's arrays of the blocks it has, by key.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from nerveseg_jax.models import keras_import  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  notop = nnx.merge(*keras_import.abstract_notop(3))
  pure = nnx.state(notop, nnx.Any(nnx.Param, nnx.BatchStat)).to_pure_dict()
  flat = jax.tree_util.tree_flatten_with_path(pure)
  values = [rng.uniform(0.5, 1.5, a.shape).astype(np.float32) if checkpoint.path_str(p)
            .endswith("/var") else (0.02 * rng.standard_normal(a.shape)).astype(np.float32)
            for p, a in flat[0]]
  pure = jax.tree_util.tree_unflatten(flat[1], values)
  converted = tmp_path / "imagenet_notop"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(converted, pure)
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "nerveseg_jax.train", "--config",
          str(REPO / "configs" / "classifier.py") + ":smoke", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.init_from={converted}",
          "--config.num_train_steps=2", "--config.learning_rate=0.0",
          "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2"]
  p = subprocess.run(args, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  result = run_result(p.stdout)
  assert np.isfinite(float(result["train_loss"])) and np.isfinite(float(result["val_loss"]))
  assert 0.0 <= float(result["val_presence_accuracy"]) <= 1.0
  config, model = loading.load_model(workdir, which="latest")
  assert config.model.name == "inception_resnet_v2" and tuple(config.data.image_size) == (75, 75)
  got = checkpoint.flat_by_path(nnx.state(model, nnx.Param).to_pure_dict())
  src = checkpoint.flat_by_path(pure)
  stem = "stem/conv_1a/conv/kernel"
  np.testing.assert_allclose(got[stem], src[stem].sum(axis=2, keepdims=True), rtol=1e-6)
  for key in ("block35/0/up/kernel", "block17/1/up/bias", "conv_7b/conv/kernel",
              "mixed_6a/b1_2/bn/bias"):
    np.testing.assert_array_equal(got[key], src[key])
  assert got["head/kernel"].shape == (1536, 1) and "head/kernel" not in src
  assert np.abs(got["head/kernel"]).max() > 0  # the head kept its own initialisation
  # The converted checkpoint and the run hold hundreds of MB: not kept in pytest's temp.
  shutil.rmtree(tmp_path, ignore_errors=True)
