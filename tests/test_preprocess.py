"""Intensity scaling and resizing (nerveseg_jax.data.preprocess)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerveseg_jax.data import preprocess


def test_normalize_numpy_and_jax_agree():
  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  a = preprocess.normalize(x)
  b = preprocess.normalize(jnp.asarray(x))
  assert isinstance(a, np.ndarray) and a.dtype == np.float32
  assert isinstance(b, jax.Array) and b.dtype == jnp.float32
  np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-6)
  assert a.min() == -1.0 and a.max() == pytest.approx(1.0)
  np.testing.assert_allclose(preprocess.from_unit(preprocess.to_unit(a)), a, atol=1e-6)
  np.testing.assert_allclose(preprocess.to_unit(a), x / 255.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(20, 30, 1), (2, 20, 30, 1), (2, 3, 20, 30, 2)])
def test_resize_is_shape_generic_and_jittable(shape):
  x = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
  out = jax.jit(lambda v: preprocess.resize(v, (10, 12)))(x)
  assert out.shape == (*shape[:-3], 10, 12, shape[-1]) and out.dtype == jnp.float32
  np.testing.assert_array_equal(preprocess.resize(x, shape[-3:-1]), x)  # same size: as is


def test_resize_antialiases_when_shrinking():
  # One-pixel stripes shrunk 4x: without antialiasing the result would keep stripes
  # (samples falling on one phase); with it every output pixel is close to the mean.
  stripes = np.tile(np.array([0.0, 255.0], np.float32), 64)[None, :, None]
  x = np.repeat(stripes, 32, axis=0)
  out = np.asarray(preprocess.resize(x, (8, 32)))
  assert np.abs(out - 127.5).max() < 20


def test_resize_mask_stays_binary_and_follows_the_shape():
  m = np.zeros((1, 420, 580, 1), np.uint8)
  m[0, 100:300, 200:400] = 1
  out = np.asarray(preprocess.resize(m, (128, 176), is_mask=True))
  assert set(np.unique(out)) == {0.0, 1.0}
  assert out.mean() == pytest.approx(m.mean(), rel=0.05)
  up = np.asarray(preprocess.resize(out, (420, 580), is_mask=True))
  assert (up == m).mean() > 0.99


@pytest.mark.parametrize("size", [(0, 5), (5,), (5, -1), "ab", (1.5, 2), None])
def test_bad_size_is_named(size):
  with pytest.raises(ValueError, match="data.image_size"):
    preprocess.check_size(size, "data.image_size")
  with pytest.raises(ValueError, match="size"):
    preprocess.resize(np.zeros((4, 4, 1)), size)
