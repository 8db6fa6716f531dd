"""A synthetic stand-in for the Kaggle Ultrasound Nerve Segmentation download.

Writes the competition's own layout so that every later stage (TFDS builder, pipeline,
training, evaluation, submission) runs unchanged on it:

  train/{s}_{f}.tif, train/{s}_{f}_mask.tif   580x420 8-bit grayscale, masks 0/255
  test/{n}.tif                                 n = 1.. (shuffled over test subjects)
  train_masks.csv        subject,img,pixels    Kaggle RLE (nerveseg_jax.rle)
  sample_submission.csv  img,pixels
  test_truth.csv         img,pixels            hidden truth of the test frames
  planted_duplicates.csv empty_id,nerve_id     planted contradictory near-duplicates

Image model (one subject = one probe sweep over a fixed piece of "world" tissue):
echogenicity = streaky tissue texture + bright near-horizontal fascia + dark vessels +
the nerve (dark fascicles in a bright rim), cropped by a probe window that drifts
smoothly; times depth attenuation; times Rayleigh speckle; then log-like compression.

CLI: python -m nerveseg_jax.data.synthetic --out DIR [--subjects N --frames M --seed S]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import pathlib
import sys

import numpy as np
from PIL import Image
from scipy import ndimage

from nerveseg_jax import rle

HEIGHT = 420
WIDTH = 580
NERVE_FRACTION = 0.41    # fraction of real training frames with a nerve
_MARGIN = 72             # world canvas margin the probe window can drift into
_WORLD = (HEIGHT + 2 * _MARGIN, WIDTH + 2 * _MARGIN)


@dataclasses.dataclass
class _Ellipse:
  """A structure placed in world coordinates (pixels of the world canvas)."""
  cy: float
  cx: float
  ry: float     # semi-axis along rows before rotation
  rx: float
  angle: float  # radians


@dataclasses.dataclass
class _Nerve(_Ellipse):
  harmonics: np.ndarray    # (K, 3): order, amplitude, phase of the boundary wobble
  fascicles: np.ndarray    # (F, 2) centres in the unit disc
  fascicle_r: np.ndarray   # (F,) radii in unit-disc units


@dataclasses.dataclass
class _Frame:
  image: np.ndarray  # uint8 (H, W)
  mask: np.ndarray   # uint8 (H, W) in {0, 1}


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
  """Gaussian-filtered white noise scaled to unit standard deviation."""
  x = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma,
                              mode="wrap")
  return x / (x.std() + 1e-6)


def _smooth_walk(rng: np.random.Generator, n: int, amplitude: float,
                 smooth: float) -> np.ndarray:
  """A slow random path of n steps spanning about +-amplitude."""
  steps = ndimage.gaussian_filter1d(rng.standard_normal(n + 40), smooth)[20:20 + n]
  path = np.cumsum(steps)
  path -= path.mean()
  span = np.abs(path).max()
  return path * (amplitude / span if span > 0 else 0.0)


def _tissue(rng: np.random.Generator) -> np.ndarray:
  """World echogenicity: streaky texture, muscle/fat patches and bright fascia."""
  h, w = _WORLD
  streaks = _smooth_noise(rng, _WORLD, (1.5, 9.0))
  fine = _smooth_noise(rng, _WORLD, (1.0, 3.0))
  patches = _smooth_noise(rng, _WORLD, (26.0, 38.0))
  # exp() skews the texture towards short bright dashes on a darker ground, the look
  # of muscle fibres and fat septa.
  e = 0.22 * np.exp(0.45 * streaks + 0.2 * fine) * np.exp(0.35 * patches)
  # Fascia: gently curved bright sheets of varied length, broken along their length.
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  for _ in range(rng.integers(18, 28)):
    # Denser and brighter near the skin, as in real neck scans.
    y0 = h * (rng.uniform(0.0, 1.0) ** 1.3)
    amp, period = rng.uniform(3, 30), rng.uniform(200, 800)
    slope, phase = rng.uniform(-0.15, 0.15), rng.uniform(0, 2 * np.pi)
    x0 = rng.uniform(-0.2, 0.9) * w
    x1 = x0 + rng.uniform(0.15, 0.9) * w
    thick = rng.uniform(1.5, 4.5)
    bright = rng.uniform(0.5, 2.2) * (1.3 - 0.7 * y0 / h)
    yc = y0 + amp * np.sin(2 * np.pi * xx[0] / period + phase) + slope * (xx[0] - w / 2)
    along = np.clip(0.6 + 0.6 * _smooth_noise(rng, (w,), 14.0), 0, 1.3)
    ends = np.clip(np.minimum(xx[0] - x0, x1 - xx[0]) / 25.0, 0, 1)
    rows = slice(int(max(yc.min() - 4 * thick, 0)), int(min(yc.max() + 4 * thick + 1, h)))
    prof = np.exp(-((yy[rows] - yc[None]) / thick) ** 2) * (along * ends)[None]
    e[rows] += bright * prof
  return np.clip(e, 0.02, None).astype(np.float32)


def _new_nerve(rng: np.random.Generator) -> _Nerve:
  # Real masks: mean area ~7100 px, taller (~116 px) than wide (~87 px), centred
  # around row 140, column 330 of the 420x580 frame.
  ry, rx = rng.uniform(46, 64), rng.uniform(34, 46)
  cy = _MARGIN + rng.uniform(110, 200)
  cx = _MARGIN + rng.uniform(240, 420)
  k = np.arange(2, 6)
  harmonics = np.stack([k, rng.uniform(0, 0.07, k.size) / np.sqrt(k - 1),
                        rng.uniform(0, 2 * np.pi, k.size)], 1)
  # Fascicles on a jittered hexagonal grid inside the unit disc: the honeycomb.
  sp = rng.uniform(0.30, 0.40)
  g = np.arange(-3, 4)
  gy, gx = np.meshgrid(g, g, indexing="ij")
  pts = np.stack([gy * sp * 0.866, (gx + 0.5 * (gy % 2)) * sp], -1).reshape(-1, 2)
  pts = pts + rng.normal(0, sp * 0.12, pts.shape)
  pts = pts[np.hypot(pts[:, 0], pts[:, 1]) < 0.78]
  radii = sp * rng.uniform(0.38, 0.55, len(pts))
  return _Nerve(cy, cx, ry, rx, rng.uniform(-0.6, 0.6), harmonics, pts, radii)


def _local_coords(e: _Ellipse, cy: float, cx: float, scale: float, angle: float,
                  pad: float = 1.3):
  """Unit-ellipse coordinates (u along ry, v along rx) over the ellipse's bbox."""
  r = max(e.ry, e.rx) * scale * pad
  y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, HEIGHT))
  x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, WIDTH))
  if y0 >= y1 or x0 >= x1:
    return None
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  dy, dx = yy - cy, xx - cx
  c, s = np.cos(angle), np.sin(angle)
  u = (c * dy + s * dx) / (e.ry * scale)
  v = (-s * dy + c * dx) / (e.rx * scale)
  return (slice(y0, y1), slice(x0, x1)), u, v


def _draw_vessel(e_img: np.ndarray, v: _Ellipse, cy: float, cx: float,
                 scale: float) -> None:
  got = _local_coords(v, cy, cx, scale, v.angle)
  if got is None:
    return
  sl, u, w = got
  rho, theta = np.hypot(u, w), np.arctan2(w, u)
  inside = 1.0 / (1.0 + np.exp((rho - 1.0) / 0.05))
  # Anechoic lumen; the wall echoes most where it faces the beam (top and bottom).
  wall = (0.2 + 0.6 * np.cos(theta) ** 2) * np.exp(-((rho - 1.08) / 0.1) ** 2)
  e_img[sl] = e_img[sl] * (1 - inside) + 0.05 * inside + wall
  # Posterior acoustic enhancement: fluid attenuates less than tissue around it.
  r = v.rx * scale
  x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, WIDTH))
  y0 = int(max(cy + v.ry * scale, 0))
  if x0 < x1 and y0 < HEIGHT:
    xs = np.arange(x0, x1, dtype=np.float32)
    across = np.clip(1 - ((xs - cx) / r) ** 2, 0, 1)
    down = np.exp(-np.arange(HEIGHT - y0, dtype=np.float32) / (3 * r))
    e_img[y0:, x0:x1] *= 1 + 0.35 * down[:, None] * across[None]


def _draw_nerve(e_img: np.ndarray, n: _Nerve, cy: float, cx: float, scale: float,
                angle: float, contrast: float) -> np.ndarray:
  """Blends the nerve into e_img; returns its outline mask (bool, H x W)."""
  mask = np.zeros((HEIGHT, WIDTH), bool)
  got = _local_coords(n, cy, cx, scale, angle)
  if got is None:
    return mask
  sl, u, v = got
  rho, theta = np.hypot(u, v), np.arctan2(v, u)
  k, a, ph = n.harmonics.T
  boundary = 1.0 + (a[:, None, None] * np.cos(k[:, None, None] * theta
                                              + ph[:, None, None])).sum(0)
  # Distance to the nearest fascicle centre, relative to its radius: dark fascicles
  # separated by bright perineurial septa.
  d = np.hypot(u[..., None] - n.fascicles[:, 0], v[..., None] - n.fascicles[:, 1])
  f = (d / n.fascicle_r).min(-1)
  fascicle = np.exp(-f ** 3)
  inner = 0.55 - 0.45 * fascicle
  # Bright epineurium, brightest where it faces the beam, and broken in places.
  beam = np.cos(theta + angle) ** 2
  rim = (0.2 + 0.9 * beam) * (0.65 + 0.35 * np.cos(3 * theta + ph[0]))
  rim = rim * np.exp(-((rho - boundary) / 0.11) ** 2)
  alpha = 1.0 / (1.0 + np.exp((rho - boundary) / 0.04))
  e_img[sl] = e_img[sl] * (1 - contrast * alpha) + contrast * (inner * alpha + rim)
  mask[sl] = rho <= boundary
  return mask


def _nerve_counts(rng: np.random.Generator, subjects: int, frames: int) -> np.ndarray:
  """Frames with a nerve per subject: varied, summing to NERVE_FRACTION of all."""
  total = int(round(NERVE_FRACTION * subjects * frames))
  w = np.clip(rng.normal(1.0, 0.4, subjects), 0.2, None)
  raw = total * w / w.sum()
  counts = np.minimum(np.floor(raw).astype(int), frames)
  # Hand out what flooring and the per-subject cap left over, largest remainder first.
  order = np.argsort(-(raw - np.floor(raw)), kind="stable")
  while counts.sum() < total:
    for s in order:
      if counts.sum() < total and counts[s] < frames:
        counts[s] += 1
  return counts


def _presence(rng: np.random.Generator, frames: int, n_on: int) -> np.ndarray:
  """Nerve contrast per frame in [0, 1]: n_on visible frames in runs, faint edges.

  The probe sweeps along the arm, so the nerve comes into view, stays a while and
  leaves; a frame is labelled (mask drawn) only where contrast >= 0.5.
  """
  c = np.zeros(frames, np.float32)
  if n_on == 0:
    return c
  runs = 2 if (n_on >= 6 and rng.uniform() < 0.3) else 1
  lengths = [n_on // runs + (1 if i < n_on % runs else 0) for i in range(runs)]
  gaps = frames - n_on
  cuts = np.sort(rng.integers(0, gaps + 1, runs))
  pos = 0
  prev_end = 0
  for i, length in enumerate(lengths):
    start = max(int(cuts[i]) + pos, prev_end)
    c[start:start + length] = 1.0
    prev_end = start + length
    pos += length
  # Faint nerve (contrast below the labelling threshold) either side of each run.
  on = c >= 1.0
  edge = np.zeros_like(on)
  edge[:-1] |= on[1:]
  edge[1:] |= on[:-1]
  c[edge & ~on] = 0.3
  return c


def _render_subject(rng: np.random.Generator, frames: int, n_on: int) -> list[_Frame]:
  h, w = HEIGHT, WIDTH
  tissue_a, tissue_b = _tissue(rng), _tissue(rng)
  morph = 0.5 + 0.5 * np.sin(rng.uniform(0, 2 * np.pi)
                             + np.arange(frames) * rng.uniform(0.03, 0.08))
  oy = np.round(_smooth_walk(rng, frames, rng.uniform(8, 30), 3.0)).astype(int)
  ox = np.round(_smooth_walk(rng, frames, rng.uniform(25, _MARGIN - 4), 3.0)).astype(int)
  nerve = _new_nerve(rng)
  n_wob = _smooth_walk(rng, frames, 0.08, 4.0)
  n_rot = _smooth_walk(rng, frames, 0.15, 4.0)
  vessels = []
  for _ in range(rng.integers(1, 4)):
    r = rng.uniform(10, 30)
    vessels.append(_Ellipse(_MARGIN + rng.uniform(60, 330), _MARGIN + rng.uniform(30, 550),
                            r * rng.uniform(0.6, 1.0), r, rng.uniform(-0.5, 0.5)))
  pulse_period = rng.uniform(4, 9)
  presence = _presence(rng, frames, n_on)
  atten = rng.uniform(0.9, 1.5)
  depth = np.exp(-atten * np.arange(h, dtype=np.float32) / h)[:, None]
  lateral = 1.0 - 0.12 * ((np.arange(w, dtype=np.float32) - w / 2) / (w / 2)) ** 2
  gain = rng.uniform(0.9, 1.15)
  out = []
  for t in range(frames):
    y0, x0 = _MARGIN + oy[t], _MARGIN + ox[t]
    e = (morph[t] * tissue_a[y0:y0 + h, x0:x0 + w]
         + (1 - morph[t]) * tissue_b[y0:y0 + h, x0:x0 + w])
    for v in vessels:
      pulse = 1.0 + 0.1 * np.sin(2 * np.pi * t / pulse_period)
      _draw_vessel(e, v, v.cy - y0, v.cx - x0, pulse)
    mask = np.zeros((h, w), bool)
    if presence[t] > 0:
      m = _draw_nerve(e, nerve, nerve.cy - y0, nerve.cx - x0, 1.0 + n_wob[t],
                      nerve.angle + n_rot[t], float(presence[t]))
      if presence[t] >= 0.5:
        mask = m
    # Skin/transducer interface: fixed bright bands at the top of every frame.
    e[:6] += 1.2
    e[6:20] += 0.5 * np.exp(-((np.arange(6, 20)[:, None] - 12) / 3.0) ** 2)
    # Speckle: magnitude of smoothed complex Gaussian noise (Rayleigh), laterally
    # elongated grains as in B-mode. Two looks are summed incoherently, as a
    # compounding scanner does, which removes the Rayleigh's black zero-lines.
    z = ndimage.gaussian_filter(rng.standard_normal((4, h, w)).astype(np.float32),
                                (0, 1.1, 2.4))
    speckle = np.sqrt((z ** 2).sum(0))
    speckle /= speckle.mean()
    intensity = e * depth * lateral * speckle * gain
    img = 255.0 * np.clip(np.log1p(3.0 * intensity) / np.log1p(3.0 * 1.6), 0, 1)
    img = img.astype(np.uint8)
    # The orientation marker of the scanner at the top centre.
    for r in range(5):
      img[r + 1, 298 - (4 - r):298 + (4 - r) + 1] = 255 if r < 4 else 200
    out.append(_Frame(img, mask.astype(np.uint8)))
  return out


def _plant_duplicate(rng: np.random.Generator, frames: list[_Frame]) -> tuple[int, int] | None:
  """Overwrites an empty frame with a near-copy of a nerve frame, mask left empty.

  Real annotators sometimes labelled one of two near-identical frames and not the
  other; the planted pair reproduces that label noise. Returns (empty, nerve) indices.
  """
  has = np.array([f.mask.any() for f in frames])
  nerve_idx, empty_idx = np.flatnonzero(has), np.flatnonzero(~has)
  if not nerve_idx.size or not empty_idx.size:
    return None
  i, j = int(rng.choice(nerve_idx)), int(rng.choice(empty_idx))
  noise = rng.normal(0, 1.5, frames[i].image.shape)
  img = np.clip(frames[i].image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
  frames[j] = _Frame(img, np.zeros_like(frames[i].mask))
  return j, i


def _save_tif(path: pathlib.Path, array: np.ndarray) -> None:
  # LZW, like the competition files; lossless so masks stay exactly 0/255.
  Image.fromarray(array, mode="L").save(path, compression="tiff_lzw")


def write_tree(out_dir: str | os.PathLike, *, subjects: int = 10, frames: int = 40,
               test_subjects: int = 2, seed: int = 0) -> pathlib.Path:
  """Writes a synthetic Kaggle-layout tree into out_dir and returns its path.

  Deterministic in (subjects, frames, test_subjects, seed). out_dir must be absent or
  empty, so a previous tree is never silently mixed with a new one.
  """
  if subjects < 1 or frames < 1 or test_subjects < 0:
    raise ValueError(f"write_tree: need subjects >= 1, frames >= 1, test_subjects >= 0; "
                     f"got {subjects}, {frames}, {test_subjects}")
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} is not empty; write the synthetic tree into a new "
                          "or empty directory")
  (out / "train").mkdir(parents=True, exist_ok=True)
  (out / "test").mkdir(exist_ok=True)
  planted = []
  n_on = _nerve_counts(np.random.default_rng([seed, 3]), subjects, frames)
  with open(out / "train_masks.csv", "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(["subject", "img", "pixels"])
    for s in range(1, subjects + 1):
      rng = np.random.default_rng([seed, 0, s])
      sub = _render_subject(rng, frames, int(n_on[s - 1]))
      # About half the subjects carry one contradictory pair, and the first always
      # does (when it can) so small trees still exercise the duplicates option.
      if s == 1 or rng.uniform() < 0.5:
        pair = _plant_duplicate(rng, sub)
        if pair is not None:
          planted.append((f"{s}_{pair[0] + 1}", f"{s}_{pair[1] + 1}"))
      for t, fr in enumerate(sub, start=1):
        _save_tif(out / "train" / f"{s}_{t}.tif", fr.image)
        _save_tif(out / "train" / f"{s}_{t}_mask.tif", fr.mask * np.uint8(255))
        rows.writerow([s, t, rle.encode(fr.mask)])
  with open(out / "planted_duplicates.csv", "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(["empty_id", "nerve_id"])
    rows.writerows(planted)
  # Test frames: further subjects, shuffled and numbered from 1 as on Kaggle.
  test = []
  n_on = _nerve_counts(np.random.default_rng([seed, 4]), max(test_subjects, 1), frames)
  for s in range(test_subjects):
    test += _render_subject(np.random.default_rng([seed, 1, s]), frames, int(n_on[s]))
  order = np.random.default_rng([seed, 2]).permutation(len(test))
  with open(out / "test_truth.csv", "w", newline="") as ft, \
       open(out / "sample_submission.csv", "w", newline="") as fs:
    truth, sample = csv.writer(ft), csv.writer(fs)
    truth.writerow(["img", "pixels"])
    sample.writerow(["img", "pixels"])
    for n, k in enumerate(order, start=1):
      _save_tif(out / "test" / f"{n}.tif", test[k].image)
      truth.writerow([n, rle.encode(test[k].mask)])
      sample.writerow([n, "1 1"])
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m nerveseg_jax.data.synthetic",
      description="Write a synthetic Kaggle-layout ultrasound nerve data set.")
  p.add_argument("--out", required=True, help="output directory (absent or empty)")
  p.add_argument("--subjects", type=int, default=10, help="training subjects")
  p.add_argument("--frames", type=int, default=40, help="frames per subject")
  p.add_argument("--test-subjects", type=int, default=2, help="subjects in test/")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  try:
    out = write_tree(a.out, subjects=a.subjects, frames=a.frames,
                     test_subjects=a.test_subjects, seed=a.seed)
  except (ValueError, FileExistsError) as e:
    p.error(str(e))
  print(f"wrote {a.subjects * a.frames} training and {a.test_subjects * a.frames} "
        f"test frames to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
