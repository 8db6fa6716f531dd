"""On-device augmentation (nerveseg_jax.data.augment)."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from nerveseg_jax.configs import common
from nerveseg_jax.data import augment, preprocess

B, H, W = 8, 32, 48


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = common.data_config().augment
  c.update(kw)
  return c


def _batch():
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:H, :W]
  masks = []
  for i in range(B):
    cy, cx, r = rng.uniform(8, H - 8), rng.uniform(8, W - 8), rng.uniform(4, 8)
    masks.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * (i % 4 != 0))
  mask = np.stack(masks)[..., None].astype(np.float32)
  # The image is the mask plus a left-right ramp: geometry can be checked on both.
  image = preprocess.normalize(np.clip(40 + 150 * mask + xx[None, ..., None], 0, 255))
  return jnp.asarray(image), jnp.asarray(mask)


_DEFAULT = jax.jit(lambda k, i, m: augment.augment(k, i, m, _cfg()))


def _run(key, image, mask, cfg=None):
  if cfg is None:  # one compilation shared by the tests of the default config
    return _DEFAULT(key, image, mask)
  # ConfigDicts are not hashable; the jitted function closes over the config instead.
  return jax.jit(lambda k, i, m: augment.augment(k, i, m, cfg))(key, image, mask)


def test_shapes_dtypes_binary_mask_and_range():
  image, mask = _batch()
  out_i, out_m = _run(jax.random.key(0), image, mask)
  assert out_i.shape == image.shape and out_i.dtype == jnp.float32
  assert out_m.shape == mask.shape and out_m.dtype == jnp.float32
  assert set(np.unique(np.asarray(out_m))) <= {0.0, 1.0}
  assert float(out_i.min()) >= -1.0 and float(out_i.max()) <= 1.0
  assert not np.allclose(np.asarray(out_i), np.asarray(image))


def test_deterministic_in_the_key():
  image, mask = _batch()
  a = _run(jax.random.key(1), image, mask)
  b = _run(jax.random.key(1), image, mask)
  c = _run(jax.random.key(2), image, mask)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_identity_when_disabled_or_zero():
  image, mask = _batch()
  out = augment.augment(jax.random.key(0), image, mask, _cfg(enabled=False))
  assert out[0] is image and out[1] is mask
  zero = _cfg(hflip=0.0, rotate_deg=0.0, scale=0.0, translate=0.0, gamma=0.0,
              contrast=0.0, brightness=0.0, speckle=0.0)
  out = _run(jax.random.key(0), image, mask, zero)
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(image), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(mask))


def test_flip_is_horizontal_and_shared_by_image_and_mask():
  image, mask = _batch()
  only_flip = _cfg(hflip=1.0, rotate_deg=0.0, scale=0.0, translate=0.0, gamma=0.0,
                   contrast=0.0, brightness=0.0, speckle=0.0)
  out_i, out_m = _run(jax.random.key(0), image, mask, only_flip)
  np.testing.assert_allclose(np.asarray(out_i), np.asarray(image)[:, :, ::-1], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out_m), np.asarray(mask)[:, :, ::-1])


def test_affine_moves_image_and_mask_together():
  image, mask = _batch()
  geo = _cfg(hflip=0.5, rotate_deg=15.0, scale=0.15, translate=0.1, gamma=0.0,
             contrast=0.0, brightness=0.0, speckle=0.0)
  out_i, out_m = _run(jax.random.key(3), image, mask, geo)
  # The disc is >= 190 grey levels, its surroundings <= 40 + W: halfway between, the
  # warped image's bright region must be the warped mask.
  grey = np.asarray(preprocess.to_unit(out_i)) * 255
  inside = np.asarray(out_m) > 0.5
  assert inside.any() and not np.array_equal(inside, np.asarray(mask) > 0.5)
  assert ((grey > 140) == inside).mean() > 0.99


def test_same_result_on_one_or_eight_devices():
  image, mask = _batch()
  mesh = jax.make_mesh((8, 1), ("data", "fsdp"))
  s = NamedSharding(mesh, P(("data", "fsdp")))
  one = _run(jax.random.key(5), image, mask)
  many = _run(jax.random.key(5), jax.device_put(image, s), jax.device_put(mask, s))
  assert many[0].sharding.spec[0] == ("data", "fsdp")
  # Same random numbers; the float ops may be fused differently per compilation, so
  # intensities agree to rounding and a mask pixel may only flip exactly at 0.5.
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(many[0]), atol=1e-5, rtol=0)
  assert (np.asarray(one[1]) != np.asarray(many[1])).mean() < 1e-3


def test_bad_config_is_named():
  image, mask = _batch()
  with pytest.raises(ValueError, match="data.augment.hflip"):
    augment.augment(jax.random.key(0), image, mask, _cfg(hflip=2.0))
  cfg = dict(_cfg())
  del cfg["speckle"]
  with pytest.raises(ValueError, match="data.augment.speckle"):
    augment.augment(jax.random.key(0), image, mask, cfg)
