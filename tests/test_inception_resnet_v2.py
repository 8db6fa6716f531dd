"""Inception-ResNet-v2: parameter counts, shapes, bf16, train/eval modes, build_model.

Shapes and counts use nnx.eval_shape (no 54M-value init, no 299 px compute). The one
concrete model is filled from numpy and run at 75 px in bfloat16; fp32 numerics are
checked against Keras in test_keras_import.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nerveseg_jax.configs import classifier as classifier_config
from nerveseg_jax.models import InceptionResNetV2, build_model, keras_import

_forward = nnx.jit(lambda model, x: model(x))


def _count(model: nnx.Module, kind=nnx.Any(nnx.Param, nnx.BatchStat)) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, kind)))


def _fill(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Gives an abstract (eval_shape) model concrete values: He-normal kernels."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model)
  for path, var in nnx.to_flat_state(state):
    a = var.get_value()
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      value = jax.random.key(seed)
    elif path[-1] == "kernel":
      value = rng.normal(0, np.sqrt(2.0 / np.prod(a.shape[:-1])), a.shape).astype(a.dtype)
    elif path[-1] == "var":
      value = np.ones(a.shape, a.dtype)
    else:
      value = np.zeros(a.shape, a.dtype)
    var.set_value(value)
  nnx.update(model, state)
  return model


@pytest.fixture(scope="module")
def notop() -> InceptionResNetV2:
  # The cached abstract model that keras_import builds on (shared with its tests).
  return nnx.merge(*keras_import.abstract_notop(3, jnp.float32))


@pytest.fixture(scope="module")
def classifier_bf16() -> InceptionResNetV2:
  """configs/classifier.py's model through build_model: 1 channel, 1 logit, head
  dropout, bf16 compute."""
  cfg = classifier_config.get_config().model
  assert cfg.in_channels == 1 and cfg.num_classes == 1 and cfg.dropout > 0
  return nnx.eval_shape(lambda: build_model(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))


def test_parameter_count_equals_keras_notop(notop):
  # Keras counts batch-norm moving statistics with the weights: 54,336,736.
  assert _count(notop) == 54_336_736
  assert _count(notop, nnx.BatchStat) == 60_544  # mean + var of 30,272 channels


def test_top_keeps_backbone_paths(notop, classifier_bf16):
  a = dict(nnx.to_flat_state(nnx.state(notop, nnx.Any(nnx.Param, nnx.BatchStat))))
  b = dict(nnx.to_flat_state(nnx.state(classifier_bf16, nnx.Any(nnx.Param, nnx.BatchStat))))
  assert set(b) - set(a) == {("head", "kernel"), ("head", "bias")}
  assert set(a) <= set(b)
  stem = ("stem", "conv_1a", "conv", "kernel")
  assert a[stem].get_value().shape == (3, 3, 3, 32)
  assert b[stem].get_value().shape == (3, 3, 1, 32)
  # Head 1536 -> 1, stem 3 -> 1 input channels; params stay float32 under bf16 compute.
  assert _count(classifier_bf16) == 54_336_736 + 1537 - 2 * 9 * 32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(
      nnx.state(classifier_bf16, nnx.Any(nnx.Param, nnx.BatchStat))))


@pytest.mark.parametrize("size,fmap", [(75, 1), (107, 2), (299, 8)])
def test_feature_map_shapes(notop, size, fmap):
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x), notop, x)
  assert out.shape == (2, fmap, fmap, 1536) and out.dtype == jnp.float32


def test_classifier_logit_shape_non_square(classifier_bf16):
  x = jax.ShapeDtypeStruct((3, 128, 176, 1), jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x), classifier_bf16, x)
  assert out.shape == (3, 1) and out.dtype == jnp.float32


def test_bad_inputs_are_named(notop):
  with pytest.raises(ValueError, match="at least 75"):
    nnx.eval_shape(lambda m, x: m(x), notop, jax.ShapeDtypeStruct((1, 74, 100, 3),
                                                                  jnp.float32))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    nnx.eval_shape(lambda m, x: m(x), notop, jax.ShapeDtypeStruct((1, 75, 75, 1),
                                                                  jnp.float32))
  with pytest.raises(ValueError, match="in_channels=2"):
    InceptionResNetV2(in_channels=2, rngs=nnx.Rngs(0))


def test_bf16_train_mode_forward(classifier_bf16):
  """bf16 forward, finite. Train mode: batch-norm statistics move, dropout is stochastic.
  Eval mode: deterministic, statistics frozen. (The fp32 numerics of eval mode are
  checked against Keras in test_keras_import.py.)
  """
  model = _fill(classifier_bf16)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 75, 75, 1)), jnp.float32)
  stats = lambda: [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
  before = stats()
  model.train()
  t1 = _forward(model, x)
  after_one = stats()
  t2 = _forward(model, x)
  model.eval()
  assert t1.shape == (2, 1) and t1.dtype == jnp.float32
  assert bool(jnp.isfinite(t1).all()) and bool(jnp.isfinite(t2).all())
  assert all(np.isfinite(a).all() for a in after_one)
  changed = [not np.array_equal(a, b) for a, b in zip(before, after_one)]
  assert all(changed), f"{changed.count(False)} batch-norm statistics did not move"
  # Train mode normalises with batch statistics, so only dropout differs between calls.
  assert not np.array_equal(t1, t2)
  # Eval mode: running statistics, no dropout, nothing moves.
  settled = stats()
  e1 = _forward(model, x)
  e2 = _forward(model, x)
  np.testing.assert_array_equal(e1, e2)
  assert bool(jnp.isfinite(e1).all()) and not np.allclose(e1, t1)
  assert all(np.array_equal(a, b) for a, b in zip(settled, stats()))


def test_build_model_errors_name_the_key():
  cfg = classifier_config.get_config().model
  with pytest.raises(ValueError, match=r"model\.features"):
    build_model(dict(cfg.to_dict(), features=8), dtype=jnp.float32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.in_channels"):
    build_model(dict(cfg.to_dict(), in_channels=4), dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_fewer_blocks_is_the_same_network_shallower():
  from nerveseg_jax import models
  small = nnx.eval_shape(lambda: models.build_model(
      {"name": "inception_resnet_v2", "blocks": (1, 2, 1)}, rngs=nnx.Rngs(0)))
  assert (len(small.block35), len(small.block17), len(small.block8)) == (1, 2, 1)
  full = dict(nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: models.build_model(
      {"name": "inception_resnet_v2"}, rngs=nnx.Rngs(0))), nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(small, nnx.Param)):
    assert full[path].value.shape == var.value.shape, path  # every array fits the full one's
  with pytest.raises(ValueError, match="blocks=\\(0, 2, 1\\)"):
    models.build_model({"name": "inception_resnet_v2", "blocks": (0, 2, 1)}, rngs=nnx.Rngs(0))
