"""Kaggle run-length codec for the Ultrasound Nerve Segmentation competition.

Pixels are numbered from 1, top to bottom then left to right (column-major), and a mask
is written as space-separated ``start length`` pairs. An empty mask is the empty string.
Pure numpy: this module imports nothing else of the project, so every face (train,
evaluate, predict, serve, the TFDS builder) shares this one codec.
"""

from __future__ import annotations

import numpy as np

HEIGHT = 420
WIDTH = 580


class RLEError(ValueError):
  """A run-length string that does not describe a valid mask."""


def encode(mask: np.ndarray) -> str:
  """Encodes a (H, W) or (H, W, 1) mask (nonzero = nerve) as a Kaggle RLE string."""
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.ndim != 2:
    raise ValueError(f"encode expects a (H, W) mask, got shape {mask.shape}")
  # Column-major order, padded with a 0 each side; bool throughout (an int64 copy
  # would cost 16 bytes a pixel on a large frame).
  padded = np.zeros(mask.size + 2, bool)
  padded[1:-1] = (mask.T != 0).reshape(-1)
  # Run boundaries are where the padded sequence changes value.
  edges = np.flatnonzero(padded[1:] != padded[:-1])
  if edges.size == 0:
    return ""
  starts = edges[0::2] + 1
  lengths = edges[1::2] - edges[0::2]
  return " ".join(f"{s} {n}" for s, n in zip(starts.tolist(), lengths.tolist()))


def decode(pixels: str | float | None, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
  """Decodes a Kaggle RLE string into a (height, width) uint8 mask of 0/1.

  Empty strings, None and NaN (what pandas gives for an empty CSV cell) decode to an
  empty mask. Raises RLEError for an odd number of values, non-positive lengths, runs
  out of range, or runs that overlap or are out of order.
  """
  total = height * width
  out = np.zeros(total, dtype=np.uint8)
  if pixels is None or (isinstance(pixels, float) and np.isnan(pixels)):
    return out.reshape(width, height).T.copy()
  text = str(pixels).strip()
  if not text:
    return out.reshape(width, height).T.copy()
  try:
    values = np.array([int(v) for v in text.split()], dtype=np.int64)
  except ValueError as e:
    raise RLEError(f"RLE has a non-integer value: {e}; string starts {text[:60]!r}") from None
  if values.size % 2:
    raise RLEError(f"RLE has an odd number of values ({values.size}); string starts {text[:60]!r}")
  starts, lengths = values[0::2], values[1::2]
  if np.any(lengths <= 0):
    i = int(np.flatnonzero(lengths <= 0)[0])
    raise RLEError(f"RLE run {i} has non-positive length {lengths[i]}")
  if np.any(starts < 1) or np.any(starts + lengths - 1 > total):
    i = int(np.flatnonzero((starts < 1) | (starts + lengths - 1 > total))[0])
    raise RLEError(
        f"RLE run {i} (start {starts[i]}, length {lengths[i]}) is outside the "
        f"{height}x{width} image (pixels 1..{total})")
  ends = starts + lengths  # exclusive, 1-indexed
  if np.any(starts[1:] < ends[:-1]):
    i = int(np.flatnonzero(starts[1:] < ends[:-1])[0]) + 1
    raise RLEError(
        f"RLE run {i} (start {starts[i]}) overlaps or precedes run {i - 1} "
        f"(start {starts[i - 1]}, length {lengths[i - 1]})")
  # Vectorised fill: +1 at each start, -1 after each end, then a running sum.
  delta = np.zeros(total + 1, dtype=np.int32)
  np.add.at(delta, starts - 1, 1)
  np.add.at(delta, ends - 1, -1)
  out[:] = np.cumsum(delta[:-1]) > 0
  return out.reshape(width, height).T.copy()
