"""Post-processing and calibration search: correctness on hand-made frames."""

import json

import numpy as np
import pytest

from nerveseg_jax import postprocess
from nerveseg_jax.postprocess import Calibration


def _blob(h, w, cy, cx, r):
  yy, xx = np.mgrid[:h, :w]
  return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)


def _random_frames(n, h=40, w=60, seed=0):
  """Frames whose probability maps are a noisy truth, plus noise-only empty frames."""
  rng = np.random.default_rng(seed)
  frames = []
  for i in range(n):
    has = i % 2 == 0
    truth = _blob(h, w, rng.integers(10, 30), rng.integers(10, 50), rng.integers(4, 9)) if has \
        else np.zeros((h, w), bool)
    prob = np.clip(0.7 * truth + rng.uniform(0, 0.55, (h, w)), 0, 1)
    presence = float(np.clip(0.6 * has + rng.uniform(0, 0.6), 0, 1))
    frames.append((prob, presence, truth.astype(np.uint8)))
  return frames


def test_apply_threshold_area_and_bbox():
  prob = np.zeros((20, 30), np.float32)
  prob[2:6, 3:10] = 0.9        # 28 px
  prob[15:17, 20:22] = 0.8     # 4 px, a second component
  d = postprocess.apply(prob, 0.9, Calibration())
  assert d.decision and d.area == 32 and d.bbox == (3, 2, 22, 17)
  d = postprocess.apply(prob, 0.9, Calibration(largest_component=True))
  assert d.area == 28 and d.bbox == (3, 2, 10, 6)
  # Presence below threshold, or area below min_area: "No nerve found" and an empty mask.
  for cal, presence in ((Calibration(), 0.4), (Calibration(min_area=33), 0.9)):
    d = postprocess.apply(prob, presence, cal)
    assert not d.decision and d.area == 0 and d.bbox is None and d.mask.sum() == 0
  # A confident presence with an empty thresholded mask is not a finding either.
  assert not postprocess.apply(np.zeros((5, 5)), 0.99, Calibration()).decision


def test_dice_from_counts_matches_project_dice():
  metrics = pytest.importorskip("nerveseg_jax.metrics")
  rng = np.random.default_rng(1)
  pred = rng.uniform(size=(6, 12, 14)) > 0.6
  truth = rng.uniform(size=(6, 12, 14)) > 0.5
  pred[0] = False
  truth[0] = False          # empty on empty
  truth[1] = False          # false positive
  pred[2] = False           # false negative
  expected = np.asarray(metrics.dice_per_example(pred, truth))
  got = postprocess.dice_from_counts((pred & truth).sum((1, 2)), pred.sum((1, 2)),
                                     truth.sum((1, 2)))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[0] == 1.0 and got[1] == 0.0 and got[2] == 0.0


def test_stats_agree_with_apply():
  frames = _random_frames(8)
  stats = postprocess.FrameStats()
  for prob, presence, truth in frames:
    stats.add(prob, presence, truth)
  for cal in (Calibration(), Calibration(0.6, 0.3, 20, True), Calibration(0.35, 0.7, 0, False)):
    direct = []
    for prob, presence, truth in frames:
      m = postprocess.apply(prob, presence, cal).mask != 0
      t = truth != 0
      direct.append(postprocess.dice_from_counts((m & t).sum(), m.sum(), t.sum()))
    np.testing.assert_allclose(stats.per_frame_dice(cal), direct)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_never_lowers_the_score(seed):
  stats = postprocess.FrameStats()
  for prob, presence, truth in _random_frames(12, seed=seed):
    stats.add(prob, presence, truth)
  result = postprocess.search(stats)
  assert result.score >= result.default_score
  np.testing.assert_allclose(result.default_score, stats.per_frame_dice(Calibration()).mean())
  np.testing.assert_allclose(result.score, stats.per_frame_dice(result.calibration).mean())
  # The search found the exhaustive optimum of its own grid (checked on a sub-grid).
  for t in (0.3, 0.5, 0.7):
    for p in (0.0, 0.5, 0.9):
      assert stats.per_frame_dice(Calibration(t, p, 0, False)).mean() <= result.score + 1e-12


def test_search_learns_a_presence_threshold():
  """Empty frames with a false blob and lower presence: the search must learn to drop them."""
  stats = postprocess.FrameStats()
  for i, (prob, presence, truth) in enumerate(_random_frames(20)):
    if not truth.any():
      # A confident false blob as large as a nerve: only presence can reject it.
      prob = np.maximum(prob, 0.95 * _blob(40, 60, 20, 30, 4 + i % 5))
    presence = 0.95 if truth.any() else 0.7   # the default 0.5 lets every empty frame in
    stats.add(prob, presence, truth)
  result = postprocess.search(stats)
  assert 0.7 <= result.calibration.presence_threshold < 0.95
  assert result.score > result.default_score + 0.3


def test_search_keeps_defaults_on_ties():
  stats = postprocess.FrameStats()
  truth = _blob(20, 20, 10, 10, 5).astype(np.uint8)
  stats.add(truth.astype(np.float32), 1.0, truth)   # perfect at any setting
  result = postprocess.search(stats)
  assert result.calibration == Calibration() and result.score == 1.0


def test_calibration_file_roundtrip_and_errors(tmp_path):
  assert postprocess.load_calibration(tmp_path) is None
  cal = Calibration(0.45, 0.6, 120, True)
  path = postprocess.save_calibration(tmp_path, cal, {"before": 0.5, "after": 0.6})
  assert json.loads(path.read_text())["scores"]["after"] == 0.6
  assert postprocess.load_calibration(tmp_path) == cal
  path.write_text('{"mask_threshold": 0.5, "presense": 1}')
  with pytest.raises(ValueError, match="calibration.json.*unknown keys"):
    postprocess.load_calibration(tmp_path)
  path.write_text('{"mask_threshold": 1.5}')
  with pytest.raises(ValueError, match="calibration.json.*mask_threshold"):
    postprocess.load_calibration(tmp_path)
  path.write_text("{not json")
  with pytest.raises(ValueError, match="calibration.json"):
    postprocess.load_calibration(tmp_path)


def test_stats_decisions_agree_with_apply():
  frames = _random_frames(10, seed=3)
  stats = postprocess.FrameStats()
  for prob, presence, truth in frames:
    stats.add(prob, presence, truth)
  for cal in (Calibration(), Calibration(0.7, 0.4, 30, True)):
    expected = [postprocess.apply(p, pr, cal).decision for p, pr, _ in frames]
    np.testing.assert_array_equal(stats.decisions(cal), expected)
