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
