"""Subject-wise K-fold split, computed at load time from data.num_folds and data.fold.

Frames of one subject are near-copies of each other (one probe sweep), so a frame-wise
split would leak: validation must hold out whole subjects.

Assignment: subjects are ordered by a SHA-256 of their id (a fixed shuffle that does
not depend on input order, Python's hash seed or numpy's RNG) and dealt round-robin
into folds, so fold sizes differ by at most one subject and the same subject always
lands in the same fold for the same set of subjects.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np


def _order_key(subject: int) -> bytes:
  return hashlib.sha256(f"nerveseg-fold:{int(subject)}".encode()).digest()


def check(num_folds, fold) -> tuple[int, int]:
  """Validated (num_folds, fold); errors name the config keys."""
  try:
    k, f = int(num_folds), int(fold)
  except (TypeError, ValueError):
    raise ValueError(f"data.num_folds={num_folds!r} and data.fold={fold!r} must be "
                     "integers") from None
  if k < 1:
    raise ValueError(f"data.num_folds={k} must be >= 1 (>= 2 to hold out a fold)")
  if f == -1:
    return k, f
  if k < 2:
    raise ValueError(f"data.num_folds={k}: holding out data.fold={f} needs at least 2 "
                     "folds; use data.fold=-1 to train on everything")
  if not 0 <= f < k:
    raise ValueError(f"data.fold={f} is out of range for data.num_folds={k}: use "
                     f"0..{k - 1}, or -1 for no validation (train on everything)")
  return k, f


def assign(subjects: Iterable[int], num_folds: int) -> dict[int, int]:
  """Fold index of every distinct subject."""
  unique = sorted({int(s) for s in np.asarray(list(subjects)).ravel()})
  order = sorted(unique, key=_order_key)
  return {s: i % num_folds for i, s in enumerate(order)}


def split_subjects(subjects: Iterable[int], num_folds: int,
                   fold: int) -> tuple[np.ndarray, np.ndarray]:
  """(train_subjects, val_subjects), sorted int32 arrays, disjoint.

  fold=-1 puts every subject in train and none in validation.
  """
  k, f = check(num_folds, fold)
  folds = assign(subjects, k)
  train = np.array(sorted(s for s, i in folds.items() if i != f), np.int32)
  val = np.array(sorted(s for s, i in folds.items() if i == f), np.int32)
  # With fewer subjects than folds the last folds are empty; only an empty choice is
  # an error (small demo sets may still use the default data.num_folds).
  if f >= 0 and folds and not val.size:
    raise ValueError(f"data.fold={f} holds no subject: the data have {len(folds)} "
                     f"subjects for data.num_folds={k}; pick a fold below {len(folds)} "
                     "or lower data.num_folds")
  return train, val


def select(subjects: np.ndarray, num_folds: int, fold: int, part: str,
           all_subjects: Iterable[int] | None = None) -> np.ndarray:
  """Boolean row mask of `subjects` for part 'train' or 'val'.

  all_subjects is the full subject set the folds are dealt over (on several hosts each
  host sees only some frames, but the folds must be the same everywhere).
  """
  if part not in ("train", "val"):
    raise ValueError(f"part must be 'train' or 'val', got {part!r}")
  train, val = split_subjects(subjects if all_subjects is None else all_subjects,
                              num_folds, fold)
  return np.isin(np.asarray(subjects), train if part == "train" else val)
