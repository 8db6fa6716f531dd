"""The synthetic Kaggle-layout generator: layout, determinism, statistics, CLI."""

import csv
import pathlib

import numpy as np
from PIL import Image
import pytest

from nerveseg_jax import rle
from nerveseg_jax.data import synthetic


def _rows(path: pathlib.Path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _read(path: pathlib.Path) -> np.ndarray:
  with Image.open(path) as im:
    assert im.mode == "L", path
    return np.asarray(im)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
  return synthetic.write_tree(tmp_path_factory.mktemp("syn") / "tree", subjects=3,
                              frames=12, test_subjects=1, seed=7)


def test_layout_and_csv_agree_with_mask_files(tree):
  rows = _rows(tree / "train_masks.csv")
  assert len(rows) == 36 and list(rows[0]) == ["subject", "img", "pixels"]
  for r in rows:
    image = _read(tree / "train" / f"{r['subject']}_{r['img']}.tif")
    mask = _read(tree / "train" / f"{r['subject']}_{r['img']}_mask.tif")
    assert image.shape == mask.shape == (420, 580)
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(rle.decode(r["pixels"]), mask > 0)
  truth = _rows(tree / "test_truth.csv")
  sample = _rows(tree / "sample_submission.csv")
  assert [r["img"] for r in truth] == [r["img"] for r in sample] == [
      str(n) for n in range(1, 13)]
  assert sorted(p.name for p in (tree / "test").iterdir()) == sorted(
      f"{n}.tif" for n in range(1, 13))
  assert _read(tree / "test" / "1.tif").shape == (420, 580)


def test_nerve_size_is_realistic(tree):
  areas = np.array([rle.decode(r["pixels"]).sum()
                    for r in _rows(tree / "train_masks.csv") if r["pixels"]])
  assert areas.size >= 3
  # Real masks: mean ~7100 px, 5th-95th percentile ~4700-10300 px.
  assert 3000 <= areas.min() and areas.max() <= 13000
  assert 5000 <= areas.mean() <= 9500


def test_nerve_fraction_matches_real(tree):
  rows = _rows(tree / "train_masks.csv")
  assert sum(bool(r["pixels"]) for r in rows) == round(0.41 * len(rows))
  truth = _rows(tree / "test_truth.csv")
  assert sum(bool(r["pixels"]) for r in truth) == round(0.41 * len(truth))
  # Subjects differ (as real ones do) but every count fits its subject.
  counts = synthetic._nerve_counts(np.random.default_rng(0), 50, 40)
  assert counts.sum() == round(0.41 * 2000) and counts.max() <= 40 and counts.std() > 2


def test_frames_drift_slowly(tree):
  def small(name):  # 1/10 scale averages the speckle out
    a = _read(tree / "train" / f"{name}.tif").astype(np.float32)
    return a.reshape(42, 10, 58, 10).mean((1, 3)).ravel()

  def corr(a, b):
    return np.corrcoef(small(a), small(b))[0, 1]

  planted = {n for r in _rows(tree / "planted_duplicates.csv") for n in r.values()}
  pairs = [(f"1_{t}", f"1_{t + 1}") for t in range(1, 12)
           if f"1_{t}" not in planted and f"1_{t + 1}" not in planted]
  same = np.mean([corr(a, b) for a, b in pairs])
  other = np.mean([corr(f"1_{t}", f"2_{t}") for t in range(1, 12)])
  # Other subjects still share the depth profile and the skin bands, hence ~0.6.
  assert same > 0.8 and same > other + 0.2


def test_planted_duplicates_contradict(tree):
  pairs = _rows(tree / "planted_duplicates.csv")
  assert pairs and list(pairs[0]) == ["empty_id", "nerve_id"]
  for p in pairs:
    empty, nerve = p["empty_id"], p["nerve_id"]
    assert empty.split("_")[0] == nerve.split("_")[0]  # same subject
    assert not _read(tree / "train" / f"{empty}_mask.tif").any()
    assert _read(tree / "train" / f"{nerve}_mask.tif").any()
    diff = np.abs(_read(tree / "train" / f"{empty}.tif").astype(int)
                  - _read(tree / "train" / f"{nerve}.tif"))
    assert diff.mean() < 3


def test_deterministic_for_a_seed(tmp_path):
  kw = dict(subjects=1, frames=3, test_subjects=1)
  a = synthetic.write_tree(tmp_path / "a", seed=1, **kw)
  b = synthetic.write_tree(tmp_path / "b", seed=1, **kw)
  c = synthetic.write_tree(tmp_path / "c", seed=2, **kw)
  files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
  for f in files:
    assert (a / f).read_bytes() == (b / f).read_bytes(), f
  assert (a / "train/1_1.tif").read_bytes() != (c / "train/1_1.tif").read_bytes()


def test_cli_and_refuses_non_empty_dir(tmp_path, capsys):
  out = tmp_path / "cli"
  assert synthetic.main(["--out", str(out), "--subjects", "1", "--frames", "2",
                         "--test-subjects", "0", "--seed", "5"]) == 0
  assert len(_rows(out / "train_masks.csv")) == 2
  assert not list((out / "test").iterdir())
  with pytest.raises(SystemExit):
    synthetic.main(["--out", str(out)])
  assert "not empty" in capsys.readouterr().err
  with pytest.raises(ValueError, match="subjects"):
    synthetic.write_tree(tmp_path / "bad", subjects=0)


def _frames(tree, nerve: bool) -> list[tuple[np.ndarray, np.ndarray]]:
  planted = {n for r in _rows(tree / "planted_duplicates.csv") for n in r.values()}
  out = []
  for r in _rows(tree / "train_masks.csv"):
    key = f"{r['subject']}_{r['img']}"
    if bool(r["pixels"]) == nerve and key not in planted:
      out.append((_read(tree / "train" / f"{key}.tif").astype(np.float32),
                  _read(tree / "train" / f"{key}_mask.tif") > 0))
  return out


def test_attenuation_with_depth(tree):
  # Below the skin bands, the upper third is brighter than the bottom third in every
  # frame (measured ~1.7-1.9; the real 1_1.tif and 1.tif: ~1.5).
  for image, _ in _frames(tree, False) + _frames(tree, True):
    rows = image[30:].mean(axis=1)
    third = len(rows) // 3
    assert rows[:third].mean() > 1.25 * rows[-third:].mean()


def test_speckle_is_multiplicative_and_laterally_elongated(tree):
  from scipy import ndimage
  for image, _ in _frames(tree, False)[:4]:
    x = image[30:400, 20:560]
    local_mean = ndimage.uniform_filter(x, 15)
    resid = x - local_mean
    local_std = np.sqrt(ndimage.uniform_filter(resid ** 2, 15))
    # Speckle: grainy at every depth, its strength proportional to the echo level.
    assert (resid.std() / x.mean()) > 0.2
    bright, dark = local_mean > np.percentile(local_mean, 75), local_mean < np.percentile(
        local_mean, 25)
    assert local_std[bright].mean() > 1.5 * local_std[dark].mean()
    # B-mode grains are wider than tall: correlation falls slower along a row.
    z = (x - x.mean()) / x.std()
    along = (z[:, 3:] * z[:, :-3]).mean()
    down = (z[3:] * z[:-3]).mean()
    assert along > down + 0.05


def test_fascia_are_near_horizontal_streaks(tree):
  from scipy import ndimage
  for image, _ in _frames(tree, False)[:4]:
    s = ndimage.gaussian_filter(image, 2)
    across = np.abs(np.diff(s, axis=0)).mean()  # changes from row to row
    along = np.abs(np.diff(s, axis=1)).mean()   # changes along a row
    assert across > 1.5 * along


def test_vessels_are_dark_round_distractors():
  # Drawn into uniform tissue: an anechoic lumen, an echoing wall, and brighter tissue
  # behind it (posterior enhancement), with no mask.
  e = np.ones((synthetic.HEIGHT, synthetic.WIDTH), np.float32)
  v = synthetic._Ellipse(cy=150, cx=300, ry=18, rx=24, angle=0.0)
  synthetic._draw_vessel(e, v, v.cy, v.cx, 1.0)
  assert e[145:156, 290:311].mean() < 0.15                        # lumen
  assert e[150 - 18 - 3:150 - 18 + 1, 295:306].mean() > 1.05     # top wall echo
  assert e[200:260, 292:309].mean() > 1.1                         # enhancement below
  assert abs(e[150, 100] - 1.0) < 1e-6                            # tissue elsewhere


def test_nerve_is_a_little_brighter_inside_its_outline():
  # Drawn into uniform tissue without speckle: the outline is the mask, the inside
  # brighter on average than the tissue (by less than half again at full contrast)
  # with brighter fascicle dashes, and contrast 0 leaves the tissue untouched.
  rng = np.random.default_rng(0)
  nerve = synthetic._new_nerve(rng)
  cy, cx = nerve.cy - synthetic._MARGIN, nerve.cx - synthetic._MARGIN
  e = np.ones((synthetic.HEIGHT, synthetic.WIDTH), np.float32)
  m = synthetic._draw_nerve(e, nerve, cy, cx, 1.0, nerve.angle, 1.0)
  assert 4000 < m.sum() < 11000
  inside = e[m]
  assert 1.2 < inside.mean() < 2.5 and np.percentile(inside, 95) > 2.0
  assert abs(e[20, 20] - 1.0) < 1e-6
  flat = np.ones_like(e)
  np.testing.assert_array_equal(
      synthetic._draw_nerve(flat, nerve, cy, cx, 1.0, nerve.angle, 0.0), m)
  assert np.all(flat == 1.0)


def test_nerve_contrast_scales_only_the_nerve(tmp_path):
  mod = _stats_module()
  kw = dict(subjects=1, frames=8, test_subjects=0, seed=4)
  base = mod.read_kaggle_tree(synthetic.write_tree(tmp_path / "a", **kw))
  strong = mod.read_kaggle_tree(synthetic.write_tree(tmp_path / "b", nerve_contrast=3.0, **kw))
  ratios = []
  for (f1, m1), (f3, m3) in zip(zip(*base), zip(*strong)):
    np.testing.assert_array_equal(m1, m3)           # same frames, same outlines
    if m1.any():
      ratios.append((mod.nerve_stats(f1, m1)["nerve_ratio"],
                     mod.nerve_stats(f3, m3)["nerve_ratio"]))
    else:  # frames without a nerve and away from one are untouched
      assert np.abs(f1.astype(int) - f3).mean() < 2
  assert ratios and all(r3 > r1 + 0.2 for r1, r3 in ratios), ratios
  with pytest.raises(ValueError, match="nerve_contrast"):
    synthetic.write_tree(tmp_path / "c", nerve_contrast=-1.0, **kw)


# Statistics of real frames, measured with docs/bench/synthetic_stats.py (its
# summarise()) on the 55 untouched training frames of kaggle_subjects_1_2 (the nerve
# figures on its 18 nerve frames; 192 letterboxed JPEG frames of nerve_real_subset
# give a subtler 1.19 and 0.40, inside the tolerances below).
REAL = dict(mean=94.2, std=57.4, p5=22, p25=53, p50=81, p75=124, p95=217,
            grain_lateral=13.0, grain_axial=2.40, bright_bands=0.103, dark_regions=0.083,
            nerve_ratio=1.30, nerve_d=0.70)
# How far synthetic frames may stray from them: absolute for gray levels and the
# nerve, relative (a factor) for grain, bands and dark regions.
ABS_TOL = dict(mean=8, std=8, p5=10, p25=10, p50=10, p75=10, p95=20,
               nerve_ratio=0.15, nerve_d=0.35)
REL_TOL = dict(grain_lateral=1.25, grain_axial=1.2, bright_bands=2.0, dark_regions=2.5)


def _stats_module():
  import importlib.util
  path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "bench" / "synthetic_stats.py"
  spec = importlib.util.spec_from_file_location("synthetic_stats", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
  mod = _stats_module()
  frames, masks, _ = mod.synthetic_frames(tmp_path_factory.mktemp("stats") / "tree",
                                          **mod.SYNTHETIC)
  return mod, mod.summarise(frames, masks)


def _far(got: dict, want: dict) -> dict:
  far = {}
  for k, w in want.items():
    g = got[k]
    ok = (abs(g - w) <= ABS_TOL[k] if k in ABS_TOL
          else 1 / REL_TOL[k] <= g / w <= REL_TOL[k])
    if not ok:
      far[k] = (round(g, 3), w)
  return far


def test_statistics_match_real_frames_reference(stats):
  assert set(ABS_TOL) | set(REL_TOL) == set(REAL)
  _, got = stats
  assert not _far(got, REAL), _far(got, REAL)


def test_statistics_match_real_frames(stats, shared_data):
  mod, got = stats
  real = mod.summarise(*mod.read_kaggle_tree(shared_data / "kaggle_subjects_1_2"))
  # The stored reference is what these frames measure ...
  for k in REAL:
    assert np.isclose(real[k], REAL[k], rtol=0.01, atol=0), (k, real[k])
  # ... and the synthetic frames are as close to the frames themselves.
  assert not _far(got, real), _far(got, real)
