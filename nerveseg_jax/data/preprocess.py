"""Intensity scaling and resizing: the one place either lives.

Both run unchanged on the host (building the resized cache) and inside jitted device
code (inference, augmentation), so they are shape-generic and free of Python control
flow on values.
"""

from __future__ import annotations

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


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 weights of `resize` along one axis (jax.image's triangle
  kernel, widened by the scale when shrinking, rows normalised to sum to 1)."""
  scale = n_out / n_in
  kernel_scale = max(1.0 / scale, 1.0)
  centres = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
  x = np.abs(centres[:, None] - np.arange(n_in, dtype=np.float64)[None, :]) / kernel_scale
  weights = np.maximum(0.0, 1.0 - x)
  weights /= weights.sum(axis=1, keepdims=True)
  return weights.astype(np.float32)


def resize_host(image: np.ndarray, size: Sequence[int], *, rows_per_block: int = 512
                ) -> np.ndarray:
  """`resize` of one (H, W) frame in numpy, as float32: the same weights, no compile.

  Inference takes frames of any size; resizing them here keeps the jitted programs to
  one input shape, where `resize` would compile one per source size. The input is
  converted to float a block of rows at a time, so a large frame costs no full float
  copy. Matches `resize` to float32 rounding.
  """
  h, w = check_size(size)
  image = np.asarray(image)
  if image.ndim != 2:
    raise ValueError(f"resize_host expects (H, W); got shape {image.shape}")
  n_rows, n_cols = image.shape
  if (n_rows, n_cols) == (h, w):
    return image.astype(np.float32)
  w_rows = _resize_weights(n_rows, h)                 # (h, H)
  w_cols = _resize_weights(n_cols, w).T               # (W, w)
  if n_rows <= rows_per_block:  # e.g. a model's output back to its frame: no temporary
    return w_rows @ (image.astype(np.float32) @ w_cols)
  out = np.zeros((h, w), np.float32)
  for start in range(0, n_rows, rows_per_block):
    block = image[start:start + rows_per_block].astype(np.float32) @ w_cols
    out += w_rows[:, start:start + rows_per_block] @ block
  return out
