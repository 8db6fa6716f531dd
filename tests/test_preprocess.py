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


def _dense_resize_reference(image: np.ndarray, size) -> np.ndarray:
  """resize_host as two products with the full (n_out, n_in) weight matrices: the
  straightforward form of the same weights, kept here to check the banded one."""
  def weights(n_in, n_out):
    scale = n_out / n_in
    kernel_scale = max(1.0 / scale, 1.0)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
    x = np.abs(centres[:, None] - np.arange(n_in, dtype=np.float64)[None, :]) / kernel_scale
    w = np.maximum(0.0, 1.0 - x)
    return w / w.sum(axis=1, keepdims=True)
  x = np.asarray(image, np.float64)
  return weights(x.shape[0], size[0]) @ x @ weights(x.shape[1], size[1]).T


@pytest.mark.parametrize("src,dst", [
    ((420, 580), (128, 176)), ((128, 176), (420, 580)),   # the server's two resizes
    ((420, 580), (96, 96)), ((97, 131), (64, 96)), ((64, 96), (97, 131)),
    ((1100, 700), (128, 128)), ((5, 3), (64, 96)), ((64, 96), (5, 3)),
    ((1, 40), (7, 9)), ((300, 2), (128, 176)), ((130, 180), (128, 176))])
def test_resize_host_is_the_dense_resize(src, dst):
  rng = np.random.default_rng(sum(src) + sum(dst))
  frame = rng.integers(0, 256, src, dtype=np.uint8)
  prob = rng.random(src, dtype=np.float32)
  for x, scale in ((frame, 255.0), (prob, 1.0)):
    got = preprocess.resize_host(x, dst)
    assert got.shape == dst and got.dtype == np.float32
    np.testing.assert_allclose(got, _dense_resize_reference(x, dst), rtol=0,
                               atol=2e-6 * scale)


def test_resize_host_same_size_is_a_float_copy():
  x = np.arange(12, dtype=np.uint8).reshape(3, 4)
  out = preprocess.resize_host(x, (3, 4))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, x)


def test_resize_host_matches_resize_after_rounding_to_uint8():
  """The uint8 frame the server feeds the network is the one the jitted resize makes,
  up to the rare pixel whose value lands on a rounding boundary."""
  rng = np.random.default_rng(1)
  noise = rng.normal(100, 40, (105, 145))
  frame = np.clip(np.kron(noise, np.ones((4, 4))), 0, 255).astype(np.uint8)  # 420x580
  host = np.round(preprocess.resize_host(frame, (128, 176)))
  jitted = np.round(np.asarray(preprocess.resize(frame[..., None], (128, 176)))[..., 0])
  assert np.abs(host - jitted).max() <= 1 and np.mean(host != jitted) < 1e-3


def test_resize_host_long_axes_are_not_cached():
  """Odd frames (here 2 x 9000) are resized like any other, without their long axis's
  taps being kept; the usual sizes are computed once and shared, read-only."""
  preprocess._cached_resize_taps.cache_clear()
  x = np.random.default_rng(4).integers(0, 256, (2, 9000), dtype=np.uint8)
  np.testing.assert_allclose(preprocess.resize_host(x, (8, 12)),
                             _dense_resize_reference(x, (8, 12)), atol=2e-6 * 255)
  back = preprocess.resize_host(np.ones((8, 12), np.float32), (2, 9000))
  np.testing.assert_allclose(back, 1.0, atol=1e-6)
  assert preprocess._cached_resize_taps.cache_info().currsize == 2   # 2 -> 8 and 8 -> 2
  index, weights = preprocess._resize_taps(580, 176)
  assert preprocess._resize_taps(580, 176)[0] is index
  assert not index.flags.writeable and not weights.flags.writeable
