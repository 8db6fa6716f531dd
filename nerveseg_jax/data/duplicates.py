"""Contradictory near-duplicates: near-identical frames of one subject whose masks disagree.

In the Kaggle set some frames were captured twice (or nearly so) and only one of the
two was annotated. Such a pair teaches the model that the same image is both "nerve"
and "no nerve". data.duplicates chooses what to do:
  keep       leave the data as it is (the competition's test set has the same noise);
  drop       remove the empty member of each pair;
  propagate  copy the non-empty member's mask onto the empty one.

Signature: each frame is box-averaged to a coarse grid (about 32 rows), made zero-mean
and unit-norm; two frames' similarity is the dot product (Pearson correlation). The
coarse grid averages away speckle, which is independent between two captures, while
keeping the anatomy; comparing only within a subject keeps this O(sum n_s^2) and avoids
matching similar anatomy of different patients.

Pairs are cached in an .npz keyed by a hash of the frames, masks, subjects and the
detector's parameters, so they are computed once per data set and image size.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

import numpy as np

MODES = ("keep", "drop", "propagate")
# Measured at 32 rows (docs/data_pipeline.md): planted synthetic near-copies correlate
# at > 0.999, the closest non-duplicate contradictory frames at <= 0.975; in the real
# frames the nearest-neighbour correlations have a spike above 0.998 (recaptures) on
# top of a continuum from slow probe motion, so the cut sits just below the spike.
DEFAULT_THRESHOLD = 0.995
_SIGNATURE_ROWS = 32
_CACHE_VERSION = 1


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"data.duplicates={mode!r}: expected one of {', '.join(MODES)}")
  return mode


def signatures(images: np.ndarray, rows: int = _SIGNATURE_ROWS) -> np.ndarray:
  """(N, H, W[, 1]) intensities -> (N, D) float32 zero-mean unit-norm coarse frames."""
  x = np.asarray(images)
  if x.ndim == 4:
    x = x[..., 0]
  if x.ndim != 3:
    raise ValueError(f"signatures expects (N, H, W[, 1]) images; got shape {x.shape}")
  n, h, w = x.shape
  f = max(1, h // rows)
  hh, ww = (h // f) * f, (w // f) * f
  x = x[:, :hh, :ww].astype(np.float32)
  x = x.reshape(n, hh // f, f, ww // f, f).mean(axis=(2, 4)).reshape(n, -1)
  x -= x.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  # A constant frame has no pattern to match: a zero vector correlates with nothing.
  return np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def pairs_from_signatures(sigs: np.ndarray, has_nerve: np.ndarray, subjects: np.ndarray,
                          threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """(K, 2) int64 rows (empty member, non-empty member) with correlation >= threshold.

  Each empty frame is paired with its most similar non-empty frame of the same subject
  (one pair per empty frame), sorted by the empty member's row.
  """
  has_nerve = np.asarray(has_nerve, bool)
  subjects = np.asarray(subjects)
  out = []
  for s in np.unique(subjects):
    rows = np.flatnonzero(subjects == s)
    empty, nerve = rows[~has_nerve[rows]], rows[has_nerve[rows]]
    if not empty.size or not nerve.size:
      continue
    corr = sigs[empty] @ sigs[nerve].T
    best = corr.argmax(axis=1)
    hit = corr[np.arange(empty.size), best] >= threshold
    out += list(zip(empty[hit], nerve[best[hit]]))
  pairs = np.array(sorted(out), np.int64).reshape(-1, 2)
  return pairs


def _content_key(images, masks, subjects, threshold: float) -> str:
  h = hashlib.blake2b(digest_size=16)
  h.update(f"v{_CACHE_VERSION}:{_SIGNATURE_ROWS}:{threshold!r}".encode())
  for a in (images, masks, subjects):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


def find_contradictory_pairs(images: np.ndarray, masks: np.ndarray, subjects: np.ndarray,
                             *, threshold: float = DEFAULT_THRESHOLD,
                             cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """(K, 2) int array: (row of the empty member, row of the non-empty member).

  With cache_dir, the result is stored as duplicates_<content hash>.npz there and read
  back on the next call with the same data.
  """
  images, masks, subjects = np.asarray(images), np.asarray(masks), np.asarray(subjects)
  if not len(images) == len(masks) == len(subjects):
    raise ValueError(f"images, masks and subjects differ in length: {len(images)}, "
                     f"{len(masks)}, {len(subjects)}")
  path = None
  if cache_dir is not None:
    path = pathlib.Path(cache_dir) / (
        f"duplicates_{_content_key(images, masks, subjects, threshold)}.npz")
    if path.exists():
      with np.load(path) as z:
        return z["pairs"]
  has_nerve = masks.reshape(len(masks), -1).any(axis=1)
  pairs = pairs_from_signatures(signatures(images), has_nerve, subjects, threshold)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed: a reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=".duplicates.", suffix=".npz", dir=path.parent)
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, pairs=pairs)
      os.replace(tmp, path)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise
  return pairs
