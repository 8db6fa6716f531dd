#!/usr/bin/env python3
"""Image statistics of real and synthetic frames, for docs/synthetic.md and its test.

Each statistic is measured per 580x420 frame (8-bit gray) and summarised over frames:
  gray levels   mean, std and the 5/25/50/75/95th percentiles of all pixels, pooled
  grain         lateral and axial autocorrelation length (px): the lag at which the
                autocorrelation of (frame - its Gaussian blur, sigma 6) falls to 0.5;
                median over frames
  bright bands  fraction of the frame brighter than 150 (after a sigma-2 blur) in
                horizontal runs at least 41 px long (opening with a 1x41 line); median
  dark regions  fraction darker than 40 (after a sigma-4 blur) in blobs holding a
                15x15 square (opening); median
  nerve         on nerve frames: mean gray inside the mask over the mean in a ring
                5-20 px outside it, and the difference of those means after a sigma-3
                blur in units of the ring's std (how many noise levels the nerve stands
                out); medians

Usage, from the repository root (writes docs/synthetic_sheet.png with --sheet):
  python docs/bench/synthetic_stats.py [--real ../shared/data] [--sheet]
"""
import argparse
import csv
import os
import pathlib
import sys
import tempfile

import numpy as np
from PIL import Image
from scipy import ndimage

PERCENTILES = (5, 25, 50, 75, 95)
# The synthetic set measured here: the demo's generator settings, fewer subjects.
SYNTHETIC = dict(subjects=6, frames=20, test_subjects=0, seed=0)


def _acf_length(frame: np.ndarray) -> tuple[float, float]:
  x = frame[20:].astype(np.float64)  # below the skin line and the orientation marker
  r = x - ndimage.gaussian_filter(x, 6)
  a = np.fft.irfft2(np.abs(np.fft.rfft2(r)) ** 2, s=r.shape)
  a /= a[0, 0]

  def half(v):
    i = int(np.argmax(v < 0.5))
    return i - 1 + (v[i - 1] - 0.5) / (v[i - 1] - v[i])
  return half(a[0, :80]), half(a[:80, 0])


def frame_stats(frame: np.ndarray) -> dict:
  f = frame.astype(np.float32)
  lateral, axial = _acf_length(f)
  bright = ndimage.binary_opening(ndimage.gaussian_filter(f, 2) > 150, np.ones((1, 41)))
  dark = ndimage.binary_opening(ndimage.gaussian_filter(f, 4) < 40, np.ones((15, 15)))
  return dict(grain_lateral=lateral, grain_axial=axial, bright_bands=bright.mean(),
              dark_regions=dark.mean())


def nerve_stats(frame: np.ndarray, mask: np.ndarray) -> dict:
  f = frame.astype(np.float32)
  ring = ndimage.binary_dilation(mask, iterations=20) & ~ndimage.binary_dilation(
      mask, iterations=5)
  s = ndimage.gaussian_filter(f, 3)
  return dict(nerve_ratio=f[mask].mean() / f[ring].mean(),
              nerve_d=(s[mask].mean() - s[ring].mean()) / s[ring].std())


def summarise(frames: list[np.ndarray], masks: list[np.ndarray]) -> dict:
  """Statistics of frames (uint8 HxW); masks (bool, same length) may be all empty."""
  pix = np.concatenate([f[::2, ::2].ravel() for f in frames]).astype(np.float32)
  out = dict(mean=float(pix.mean()), std=float(pix.std()))
  out.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(pix, PERCENTILES))})
  per = [frame_stats(f) for f in frames]
  out.update({k: float(np.median([p[k] for p in per])) for k in per[0]})
  nerves = [nerve_stats(f, m) for f, m in zip(frames, masks) if m.any()]
  if nerves:
    out.update({k: float(np.median([n[k] for n in nerves])) for k in nerves[0]})
  return out


def _read(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("L"))


def read_kaggle_tree(root, skip=()) -> tuple[list, list]:
  """Training frames and masks of a Kaggle-layout tree, leaving out ids in skip."""
  root = pathlib.Path(root)
  with open(root / "train_masks.csv", newline="") as f:
    ids = [f"{r['subject']}_{r['img']}" for r in csv.DictReader(f)]
  ids = [i for i in ids if i not in set(skip)]
  return ([_read(root / "train" / f"{i}.tif") for i in ids],
          [_read(root / "train" / f"{i}_mask.tif") > 0 for i in ids])


def read_nerve_subset(root, every: int = 8) -> tuple[list, list]:
  """Every `every`-th frame of the letterboxed 256x256 JPEG set, un-letterboxed and
  resized back to 580x420 (only its nerve statistics are comparable: the JPEG and the
  resize change grain and histogram)."""
  root = pathlib.Path(root)
  frames, masks = [], []
  for p in sorted((root / "images").glob("*.jpg"))[::every]:
    # 80 of 580 rows of gray were added above and below before the resize to 256.
    top, bottom = round(80 * 256 / 580), round(500 * 256 / 580)
    img = Image.fromarray(_read(p)[top:bottom]).resize((580, 420), Image.BILINEAR)
    m = Image.fromarray(_read(root / "masks" / f"{p.stem}_mask.jpg")[top:bottom])
    frames.append(np.asarray(img))
    masks.append(np.asarray(m.resize((580, 420), Image.BILINEAR)) >= 128)
  return frames, masks


def synthetic_frames(out_dir, **kw) -> tuple[list, list, list]:
  """Writes a synthetic tree; returns (frames, masks, ids), planted duplicates left out."""
  from nerveseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  tree = synthetic.write_tree(out_dir, **kw)
  with open(tree / "planted_duplicates.csv", newline="") as f:
    planted = {i for r in csv.DictReader(f) for i in r.values()}
  frames, masks = read_kaggle_tree(tree, skip=planted)
  return frames, masks, tree


def _sheet(real_root: pathlib.Path, tree: pathlib.Path, out: pathlib.Path) -> None:
  """Two rows of four frames: real on top, synthetic below, each row two frames with
  a nerve then two without (no outlines: the eye should judge the look unaided)."""
  def pick(root, nerve, n, skip=()):
    with open(root / "train_masks.csv", newline="") as f:
      rows = [r for r in csv.DictReader(f) if bool(r["pixels"]) == nerve]
    ids = [f"{r['subject']}_{r['img']}" for r in rows]
    ids = [i for i in ids if i not in skip]
    return [_read(root / "train" / f"{i}.tif") for i in ids[::max(1, len(ids) // n)][:n]]

  with open(tree / "planted_duplicates.csv", newline="") as f:
    planted = {i for r in csv.DictReader(f) for i in r.values()}
  rows = [pick(real_root, True, 2) + pick(real_root, False, 2),
          pick(tree, True, 2, planted) + pick(tree, False, 2, planted)]
  gap = 8
  sheet = np.full((2 * 420 + gap + 40, 4 * 580 + 3 * gap), 255, np.uint8)
  for r, row in enumerate(rows):
    for c, img in enumerate(row):
      y, x = 40 * (r == 1) + r * (420 + gap), c * (580 + gap)
      sheet[y:y + 420, x:x + 580] = img
  im = Image.fromarray(sheet).resize((sheet.shape[1] // 2, sheet.shape[0] // 2),
                                     Image.LANCZOS)
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  ImageDraw.Draw(im).text((4, 214), "top: real (nerve, nerve, no nerve, no nerve)   "
                          "bottom: synthetic (nerve, nerve, no nerve, no nerve)", fill=0)
  im.save(out, optimize=True)


def measure(real_root: pathlib.Path | None, tmp: str) -> dict[str, dict]:
  frames, masks, tree = synthetic_frames(pathlib.Path(tmp) / "syn", **SYNTHETIC)
  out = {"synthetic": summarise(frames, masks)}
  if real_root is not None:
    out["real (kaggle_subjects_1_2)"] = summarise(
        *read_kaggle_tree(real_root / "kaggle_subjects_1_2"))
    out["real nerves (nerve_real_subset)"] = {
        k: v for k, v in summarise(*read_nerve_subset(real_root / "nerve_real_subset")).items()
        if k.startswith("nerve")}
  out["_tree"] = tree
  return out


def main() -> int:
  here = pathlib.Path(__file__).resolve().parents[2]
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--real", default=str(here.parent / "shared" / "data"),
                 help="folder holding kaggle_subjects_1_2/ and nerve_real_subset/")
  p.add_argument("--sheet", action="store_true", help="write docs/synthetic_sheet.png")
  a = p.parse_args()
  real = pathlib.Path(a.real)
  real = real if real.exists() else None
  sys.path.insert(0, str(here))
  with tempfile.TemporaryDirectory() as tmp:
    got = measure(real, tmp)
    tree = got.pop("_tree")
    keys = list(got["synthetic"])
    print("| statistic | " + " | ".join(got) + " |")
    print("|---" * (len(got) + 1) + "|")
    for k in keys:
      cells = [f"{g[k]:.3g}" if k in g else "" for g in got.values()]
      print(f"| {k} | " + " | ".join(cells) + " |")
    if a.sheet:
      if real is None:
        p.error("--sheet needs the real frames (--real)")
      _sheet(real / "kaggle_subjects_1_2", tree, here / "docs" / "synthetic_sheet.png")
      print("wrote docs/synthetic_sheet.png")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.exit(main())
