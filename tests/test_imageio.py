"""Overlays and outlines (nerveseg_jax.imageio) against their direct definitions."""

import numpy as np
import pytest
from scipy import ndimage

from nerveseg_jax import imageio

_CROSS = ndimage.generate_binary_structure(2, 1)


def _outline_reference(mask, thickness=1):
  m = np.asarray(mask) != 0
  return m & ~ndimage.binary_erosion(m, structure=_CROSS, iterations=thickness, border_value=0)


def _overlay_reference(gray, mask, truth, thickness):
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  if truth is not None:
    rgb[_outline_reference(truth, thickness)] = imageio.TRUTH_COLOR
  m = mask != 0
  for channel, color in zip(np.moveaxis(rgb, -1, 0), imageio.PRED_COLOR):
    channel[m] = (3 * channel[m].astype(np.uint16) + color) // 4
  rgb[_outline_reference(m, thickness)] = imageio.PRED_COLOR
  return rgb


def _masks(shape):
  """Empty, full, touching each edge, a thin line, a single pixel, two blobs, noise."""
  h, w = shape
  yy, xx = np.mgrid[:h, :w]
  rng = np.random.default_rng(0)
  out = [np.zeros(shape, np.uint8), np.ones(shape, np.uint8)]
  out.append(((yy - h // 2) ** 2 / (h / 5) ** 2 + (xx - w // 2) ** 2 / (w / 6) ** 2 < 1))
  out.append((yy < h // 3) & (xx < w // 2))            # the top-left corner
  out.append((yy > h - 4) | (xx > w - 3))              # bottom and right edges
  out.append(xx == w // 3)                             # one column, edge to edge
  single = np.zeros(shape, bool)
  single[h // 2, w // 4] = True
  out.append(single)
  out.append(((yy - 10) ** 2 + (xx - 10) ** 2 < 30) | ((yy - h + 12) ** 2 + (xx - w + 9) ** 2 < 50))
  out.append(rng.random(shape) > 0.6)
  return [np.asarray(m, np.uint8) for m in out]


@pytest.mark.parametrize("thickness", [1, 2, 3])
def test_outline_is_the_boundary_of_the_whole_frame_erosion(thickness):
  for mask in _masks((60, 80)):
    np.testing.assert_array_equal(imageio.outline(mask, thickness),
                                  _outline_reference(mask, thickness))


@pytest.mark.parametrize("shape", [(60, 80), (420, 580), (700, 950)])
def test_overlay_tints_and_outlines_as_defined(shape):
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, shape, dtype=np.uint8)
  thickness = max(1, round(max(shape) / 300))
  masks = _masks(shape)
  for mask in masks:
    for truth in (None, masks[2]):
      got = imageio.overlay(gray, mask, truth)
      np.testing.assert_array_equal(got, _overlay_reference(gray, mask, truth, thickness))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (420, 580), (61, 77, 3), (420, 580, 3)])
def test_png_bytes_fast_decodes_to_the_same_pixels(shape):
  import io
  from PIL import Image
  rng = np.random.default_rng(2)
  for array in (rng.integers(0, 256, shape, dtype=np.uint8), np.zeros(shape, np.uint8),
                np.full(shape, 255, np.uint8)):
    data = imageio.png_bytes_fast(array)
    Image.open(io.BytesIO(data)).verify()   # signature, chunk CRCs
    back = Image.open(io.BytesIO(data))
    assert back.mode == ("L" if len(shape) == 2 else "RGB")
    np.testing.assert_array_equal(np.asarray(back), array)
    np.testing.assert_array_equal(imageio.decode_gray(data), array if len(shape) == 2
                                  else np.asarray(back.convert("L")))


def test_png_bytes_fast_takes_views_and_refuses_other_arrays():
  import io
  from PIL import Image
  array = np.arange(200, dtype=np.uint8).reshape(10, 20)
  view = array[::2, ::3]                     # not contiguous
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(imageio.png_bytes_fast(view)))), view)
  for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8),
              np.zeros((0, 4), np.uint8), np.zeros(4, np.uint8)):
    with pytest.raises(ValueError, match="png_bytes_fast"):
      imageio.png_bytes_fast(bad)
