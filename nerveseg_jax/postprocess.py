"""Post-processing of mask probabilities, and its calibration on the validation fold.

A frame's mask probability map (at source resolution) and presence probability become
a binary mask and a decision by four settings, the `Calibration`:
  mask = prob > mask_threshold, optionally only its largest connected component;
  nerve found  <=>  presence > presence_threshold and mask area >= max(min_area, 1);
  otherwise the mask is emptied and the frame reported as "No nerve found".

Calibration chooses the four on labelled frames to maximise the Kaggle score (mean
Dice, empty-on-empty = 1). It is a grid search made cheap by sufficient statistics:
per frame and per (mask_threshold, largest_component) the intersection with the truth
and the predicted area are computed once (`FrameStats`); every (presence_threshold,
min_area) pair is then scored from those counts in one vectorised numpy expression.
The defaults are in the grid and win ties, so calibration never lowers the score.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
from scipy import ndimage

from nerveseg_jax import workdir as workdir_lib

CALIBRATION_FILE = "calibration.json"
# What every face shows for a frame judged empty (the page, the API, the overlays).
NO_NERVE = "No nerve found"
NERVE_FOUND = "Nerve found"
# Candidate settings. Presence 1.0 means "never", i.e. an all-empty submission is in
# the grid too. Min areas are fractions of the frame, scaled to source pixels.
MASK_THRESHOLDS = tuple(np.round(np.arange(0.2, 0.801, 0.05), 3).tolist())
PRESENCE_THRESHOLDS = tuple(np.round(np.linspace(0.0, 1.0, 41), 4).tolist())
MIN_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125,
                      0.015, 0.02, 0.025, 0.03)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Post-processing settings; the defaults are the uncalibrated choice."""
  mask_threshold: float = 0.5
  presence_threshold: float = 0.5
  min_area: int = 0               # source pixels
  largest_component: bool = False

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "calibration") -> "Calibration":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"{source}: unknown keys {unknown}; known: {sorted(known)}")
    try:
      cal = cls(mask_threshold=float(d.get("mask_threshold", 0.5)),
                presence_threshold=float(d.get("presence_threshold", 0.5)),
                min_area=int(d.get("min_area", 0)),
                largest_component=bool(d.get("largest_component", False)))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: bad value ({e})") from None
    if not 0.0 <= cal.mask_threshold < 1.0:
      raise ValueError(f"{source}: mask_threshold must be in [0, 1), got {cal.mask_threshold}")
    if not 0.0 <= cal.presence_threshold <= 1.0:
      raise ValueError(
          f"{source}: presence_threshold must be in [0, 1], got {cal.presence_threshold}")
    if cal.min_area < 0:
      raise ValueError(f"{source}: min_area must be >= 0, got {cal.min_area}")
    return cal


def load_calibration(workdir: str | pathlib.Path) -> Calibration | None:
  """Reads WORKDIR/calibration.json; None when the run was never calibrated."""
  path = pathlib.Path(workdir) / CALIBRATION_FILE
  if not path.exists():
    return None
  try:
    d = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable calibration file ({e})") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object")
  d = {k: v for k, v in d.items() if k != "scores"}  # scores are a record, not settings
  return Calibration.from_dict(d, str(path))


def save_calibration(workdir: str | pathlib.Path, cal: Calibration,
                     scores: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes WORKDIR/calibration.json (atomically, so a reader never sees half a file)."""
  path = pathlib.Path(workdir) / CALIBRATION_FILE
  d = cal.to_dict()
  if scores:
    d["scores"] = scores
  workdir_lib.write_text_atomic(path, json.dumps(d, indent=2) + "\n")
  return path


def largest_component(mask: np.ndarray) -> np.ndarray:
  """Keeps the largest 8-connected component of a boolean (H, W) mask."""
  labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
  if count <= 1:
    return mask
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return labels == int(np.argmax(sizes))


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
  """(x0, y0, x1, y1) of a mask, inclusive-exclusive, in pixels; None when empty."""
  rows = np.flatnonzero(mask.any(axis=1))
  if rows.size == 0:
    return None
  cols = np.flatnonzero(mask.any(axis=0))
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclasses.dataclass
class Decision:
  mask: np.ndarray               # uint8 (H, W) 0/1, empty when no nerve was found
  decision: bool                 # True: nerve found
  area: int                      # pixels of `mask`
  bbox: tuple[int, int, int, int] | None


def apply(mask_prob: np.ndarray, presence: float, cal: Calibration) -> Decision:
  """Turns one frame's (H, W) mask probability and presence probability into a result."""
  mask = np.asarray(mask_prob) > cal.mask_threshold
  if cal.largest_component:
    mask = largest_component(mask)
  area = int(mask.sum())
  found = bool(presence > cal.presence_threshold and area >= max(cal.min_area, 1))
  if not found:
    return Decision(np.zeros(mask.shape, np.uint8), False, 0, None)
  return Decision(mask.astype(np.uint8), True, area, bbox(mask))


def caption(decision: bool, presence: float, dice: float | None = None) -> str:
  """The one-line verdict written on an overlay: decision, presence and, with truth, Dice."""
  text = f"{NERVE_FOUND if decision else NO_NERVE} | presence {100 * float(presence):.1f}%"
  return text if dice is None else f"{text} | Dice {float(dice):.3f}"


def dice_from_counts(intersection: np.ndarray, pred_area: np.ndarray,
                     truth_area: np.ndarray) -> np.ndarray:
  """Dice from pixel counts, empty-on-empty = 1 (the grid search's fast path).

  The counts form of metrics.dice_per_example; tests check that the two agree.
  """
  intersection, pred_area, truth_area = np.broadcast_arrays(
      np.asarray(intersection, np.float64), np.asarray(pred_area, np.float64),
      np.asarray(truth_area, np.float64))
  total = pred_area + truth_area
  return np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1.0))


class FrameStats:
  """Per-frame sufficient statistics for the calibration grid, accumulated per frame."""

  def __init__(self, mask_thresholds: tuple[float, ...] = MASK_THRESHOLDS):
    thresholds = set(mask_thresholds) | {Calibration().mask_threshold}
    self.mask_thresholds = np.array(sorted(thresholds), np.float64)
    self._inter: list[np.ndarray] = []   # each (T, 2): [threshold, largest_component]
    self._area: list[np.ndarray] = []
    self._truth_area: list[int] = []
    self._presence: list[float] = []
    self._frame_area: list[int] = []

  def add(self, mask_prob: np.ndarray, presence: float, truth: np.ndarray) -> None:
    """Adds one frame: (H, W) mask probability, presence probability, (H, W) truth."""
    prob = np.asarray(mask_prob)
    truth = np.asarray(truth) != 0
    if prob.shape != truth.shape:
      raise ValueError(f"mask probability {prob.shape} and truth {truth.shape} differ in shape")
    t = len(self.mask_thresholds)
    inter = np.zeros((t, 2), np.int64)
    area = np.zeros((t, 2), np.int64)
    for i, threshold in enumerate(self.mask_thresholds):
      mask = prob > threshold
      inter[i, 0], area[i, 0] = np.count_nonzero(mask & truth), np.count_nonzero(mask)
      big = largest_component(mask)
      if big is mask:  # zero or one component: nothing removed
        inter[i, 1], area[i, 1] = inter[i, 0], area[i, 0]
      else:
        inter[i, 1], area[i, 1] = np.count_nonzero(big & truth), np.count_nonzero(big)
    self._inter.append(inter)
    self._area.append(area)
    self._truth_area.append(int(truth.sum()))
    self._presence.append(float(presence))
    self._frame_area.append(int(truth.size))

  def __len__(self) -> int:
    return len(self._presence)

  def extend(self, other: "FrameStats") -> None:
    """Adds OTHER's frames (statistics on the same threshold grid), e.g. another fold's."""
    if not np.array_equal(self.mask_thresholds, other.mask_thresholds):
      raise ValueError("FrameStats on different mask-threshold grids cannot be merged")
    for mine, theirs in ((self._inter, other._inter), (self._area, other._area),
                         (self._truth_area, other._truth_area),
                         (self._presence, other._presence),
                         (self._frame_area, other._frame_area)):
      mine.extend(theirs)

  def arrays(self) -> dict[str, np.ndarray]:
    """inter, area (T, 2, N); truth_area, presence, frame_area (N,)."""
    if not self._presence:
      raise ValueError("no frames were added")
    return dict(inter=np.stack(self._inter, -1), area=np.stack(self._area, -1),
                truth_area=np.array(self._truth_area, np.int64),
                presence=np.array(self._presence, np.float64),
                frame_area=np.array(self._frame_area, np.int64))

  def _counts(self, cal: Calibration) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    a = self.arrays()
    matches = np.flatnonzero(np.isclose(self.mask_thresholds, cal.mask_threshold))
    if matches.size == 0:
      raise ValueError(f"mask_threshold {cal.mask_threshold} is not in the statistics grid "
                       f"{self.mask_thresholds.tolist()}")
    i, lc = int(matches[0]), int(cal.largest_component)
    return a["inter"][i, lc], a["area"][i, lc], a

  def per_frame_dice(self, cal: Calibration) -> np.ndarray:
    """(N,) Dice of every frame under `cal` (which must use a mask threshold in the grid)."""
    inter, area, a = self._counts(cal)
    return _score(inter, area, a["truth_area"], a["presence"],
                  np.array([cal.presence_threshold]), np.array([cal.min_area]))[0, 0]

  def decisions(self, cal: Calibration) -> np.ndarray:
    """(N,) bool: nerve found under `cal` (the rule of `apply`)."""
    _, area, a = self._counts(cal)
    return (a["presence"] > cal.presence_threshold) & (area >= max(cal.min_area, 1))


def _score(inter: np.ndarray, area: np.ndarray, truth_area: np.ndarray,
           presence: np.ndarray, presence_thresholds: np.ndarray,
           min_areas: np.ndarray) -> np.ndarray:
  """Per-frame Dice (P, A, N) for every (presence threshold, min area) pair."""
  found = ((presence[None, None, :] > presence_thresholds[:, None, None])
           & (area[None, None, :] >= np.maximum(min_areas, 1)[None, :, None]))
  kept = dice_from_counts(inter, area, truth_area)[None, None, :]
  dropped = (truth_area == 0).astype(np.float64)[None, None, :]  # empty prediction
  return np.where(found, kept, dropped)


@dataclasses.dataclass
class SearchResult:
  calibration: Calibration
  score: float                    # mean Dice over the frames with `calibration`
  default_score: float            # mean Dice of the starting point: Calibration()
                                  # (uncalibrated) for search, base for search_presence
  num_frames: int
  grid_size: int


def search(stats: FrameStats, *,
           presence_thresholds: tuple[float, ...] = PRESENCE_THRESHOLDS,
           min_area_fractions: tuple[float, ...] = MIN_AREA_FRACTIONS,
           allow_largest_component: bool = True) -> SearchResult:
  """Chooses the Calibration that maximises the mean Dice over the added frames."""
  a = stats.arrays()
  default = Calibration()
  # Min areas in source pixels, relative to the typical frame of this set.
  frame_area = float(np.median(a["frame_area"]))
  min_areas = np.unique(np.round(np.array(min_area_fractions) * frame_area).astype(np.int64))
  min_areas = np.union1d(min_areas, [default.min_area])
  presence_thresholds = np.union1d(np.array(presence_thresholds, np.float64),
                                   [default.presence_threshold])
  default_score = float(stats.per_frame_dice(default).mean())
  best_score, best = default_score, default
  for i, threshold in enumerate(stats.mask_thresholds):
    for lc in ((0, 1) if allow_largest_component else (0,)):
      mean = _score(a["inter"][i, lc], a["area"][i, lc], a["truth_area"], a["presence"],
                    presence_thresholds, min_areas).mean(-1)
      p, m = np.unravel_index(int(np.argmax(mean)), mean.shape)
      # Strictly better only (with a float tolerance): ties keep the simpler choice.
      if mean[p, m] > best_score + 1e-12:
        best_score = float(mean[p, m])
        best = Calibration(mask_threshold=float(threshold),
                           presence_threshold=float(presence_thresholds[p]),
                           min_area=int(min_areas[m]), largest_component=bool(lc))
  grid = (len(stats.mask_thresholds) * (2 if allow_largest_component else 1)
          * len(presence_thresholds) * len(min_areas))
  return SearchResult(best, best_score, default_score, len(stats), grid)


def search_presence(stats: FrameStats, base: Calibration, *,
                    presence_thresholds: tuple[float, ...] = PRESENCE_THRESHOLDS
                    ) -> SearchResult:
  """Chooses only the presence threshold; `base`'s mask settings stay as they are.

  For the two-stage pipeline, where a classifier's presence is thresholded and the
  segmentation run's mask settings are its own (calibrated without the classifier).
  Scored like `search`, from the same statistics; `base` (in the returned
  `default_score`) is in the grid and wins ties, so this never lowers its score.
  """
  inter, area, a = stats._counts(base)  # pylint: disable=protected-access
  thresholds = np.union1d(np.array(presence_thresholds, np.float64),
                          [base.presence_threshold])
  mean = _score(inter, area, a["truth_area"], a["presence"], thresholds,
                np.array([base.min_area]))[:, 0].mean(-1)
  base_score = float(stats.per_frame_dice(base).mean())
  best_score, best = base_score, base
  p = int(np.argmax(mean))
  if mean[p] > best_score + 1e-12:
    best_score = float(mean[p])
    best = dataclasses.replace(base, presence_threshold=float(thresholds[p]))
  return SearchResult(best, best_score, base_score, len(stats), len(thresholds))
