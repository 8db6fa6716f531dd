"""Intensity scaling and resizing: the one place either lives.

Both run unchanged on the host (building the resized cache) and inside jitted device
code (inference, augmentation), so they are shape-generic and free of Python control
flow on values.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# uint8 [0, 255] -> float [-1, 1]: zero-centred inputs suit the first convolution even
# when a model runs without normalisation layers (model.norm='none').
_SCALE = 2.0 / 255.0
_OFFSET = -1.0

Array = np.ndarray | jax.Array


def _xp(x):
  return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def normalize(image: Array) -> Array:
  """uint8 (or float in [0, 255]) intensities -> float32 in [-1, 1]; numpy or jax."""
  xp = _xp(image)
  return image.astype(xp.float32) * xp.float32(_SCALE) + xp.float32(_OFFSET)


def to_unit(x: Array) -> Array:
  """Normalised intensities -> [0, 1] (for photometric augmentation such as gamma)."""
  xp = _xp(x)
  return (x - xp.float32(_OFFSET)) * xp.float32(1.0 / (_SCALE * 255.0))


def from_unit(u: Array) -> Array:
  """Inverse of to_unit."""
  xp = _xp(u)
  return u * xp.float32(_SCALE * 255.0) + xp.float32(_OFFSET)


def check_size(size: Sequence[int], what: str = "size") -> tuple[int, int]:
  """(H, W) as two positive ints, or a ValueError naming `what` (e.g. a config key)."""
  try:
    h, w = (int(s) for s in size)
    ok = all(float(s) == int(s) for s in size)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be two positive integers (H, W); got {size!r}") from None
  if not ok or h <= 0 or w <= 0:
    raise ValueError(f"{what} must be two positive integers (H, W); got {size!r}")
  return h, w


def resize(images: Array, size: Sequence[int], *, is_mask: bool = False) -> jax.Array:
  """Resizes (..., H, W, C) to (..., size[0], size[1], C) as float32.

  Bilinear, antialiased when shrinking (jax.image.resize's triangle kernel widens
  with the scale factor, so small structures are averaged, not aliased). Masks are
  resized the same way and thresholded at 0.5, so a mask stays in {0, 1} and its
  boundary sits where the image's does. Jittable; any number of leading dimensions.
  """
  h, w = check_size(size)
  x = jnp.asarray(images)
  if x.ndim < 3:
    raise ValueError(f"resize expects (..., H, W, C); got shape {x.shape}")
  x = x.astype(jnp.float32)
  if x.shape[-3:-1] == (h, w):
    out = x
  else:
    out = jax.image.resize(x, (*x.shape[:-3], h, w, x.shape[-1]), method="linear",
                           antialias=True)
  if is_mask:
    out = (out >= 0.5).astype(jnp.float32)
  return out


# Axis lengths up to this have their taps cached (a few kB each); longer ones, only
# from odd frames, are recomputed rather than held.
_CACHED_AXIS = 8192


def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """`resize`'s weights along one axis as a band: (n_out, K) source indices and
  (n_out, K) float32 weights, the nonzero run of each row of the (n_out, n_in) matrix.

  jax.image's triangle kernel, widened by the scale when shrinking, rows normalised to
  sum to 1. Its support is about 2 * max(n_in / n_out, 1) samples wide, so the band is
  that narrow whatever the frame's size, where the dense matrix has n_out * n_in
  entries, almost all zero, and multiplying by it costs n_in / K times the work.
  Taps past the frame's edge get index n_in - 1 and weight 0. Cached: a server sees the
  same few (frame size, model size) pairs again and again.
  """
  if max(n_in, n_out) <= _CACHED_AXIS:
    return _cached_resize_taps(n_in, n_out)
  return _compute_resize_taps(n_in, n_out)


def _compute_resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  scale = n_out / n_in
  kernel_scale = max(1.0 / scale, 1.0)
  centres = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
  first = np.maximum(np.floor(centres - kernel_scale).astype(np.int64), 0)
  last = np.minimum(np.ceil(centres + kernel_scale).astype(np.int64), n_in - 1)
  taps = int((last - first).max()) + 1
  index = first[:, None] + np.arange(taps)[None, :]
  x = np.abs(centres[:, None] - index) / kernel_scale
  weights = np.where(index <= last[:, None], np.maximum(0.0, 1.0 - x), 0.0)
  weights /= weights.sum(axis=1, keepdims=True)
  index = np.minimum(index, n_in - 1).astype(np.intp)
  weights = weights.astype(np.float32)
  for a in (index, weights):
    a.flags.writeable = False  # shared by every caller through the cache
  return index, weights


_cached_resize_taps = functools.lru_cache(maxsize=64)(_compute_resize_taps)


def resize_host(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """`resize` of one (H, W) frame in numpy, as float32: the same weights, no compile.

  Inference takes frames of any size; resizing them here keeps the jitted programs to
  one input shape, where `resize` would compile one per source size. Each axis is a
  weighted sum of a few neighbouring columns (then rows), `_resize_taps`'s band, rather
  than a product with a mostly-zero matrix: a 420x580 frame to 128x176 and a 128x176
  mask back each take about a millisecond, and multi-threaded BLAS, which stalls when
  other processes hold the cores, is not involved. A uint8 frame is converted to float
  one gathered column block at a time, so a large frame costs no full float copy.
  Matches `resize` to float32 rounding.
  """
  h, w = check_size(size)
  image = np.asarray(image)
  if image.ndim != 2:
    raise ValueError(f"resize_host expects (H, W); got shape {image.shape}")
  if image.shape == (h, w):
    return image.astype(np.float32)
  index, weights = _resize_taps(image.shape[1], w)
  cols = np.zeros((image.shape[0], w), np.float32)
  for k in range(index.shape[1]):
    cols += np.take(image, index[:, k], axis=1) * weights[:, k]  # faster than image[:, i]
  index, weights = _resize_taps(image.shape[0], h)
  out = np.zeros((h, w), np.float32)
  for k in range(index.shape[1]):
    out += np.take(cols, index[:, k], axis=0) * weights[:, k, None]
  return out
