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
echogenicity = tissue layers + long horizontal fibre texture + bright fascia bands +
dark muscle bellies + dark vessels + the nerve (a little brighter than its
surroundings, with bright fascicle echoes and a partial arc), cropped by a probe window
that drifts smoothly; times depth attenuation; times weak, coarse speckle; then a log
and a gray map onto real frames' gray-level percentiles. docs/synthetic.md compares
the result's statistics with real frames'.

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
# Bumped whenever the frames this generator draws change: it names the generated tree
# (tfds_source.synthetic_key), so a tree drawn by an older generator is never reused.
GENERATOR_VERSION = 2
NERVE_FRACTION = 0.41    # fraction of real training frames with a nerve
_MARGIN = 72             # world canvas margin the probe window can drift into
_WORLD = (HEIGHT + 2 * _MARGIN, WIDTH + 2 * _MARGIN)
# The scanner's gray map: the gray levels at the 0th, 5th, ..., 95th percentiles of
# real training frames (55 frames of two subjects, pooled), and 255 from the 97.5th on
# (2.5% of real pixels are saturated). Each subject's log-echo image is mapped onto
# them (with a small gain change), so its histogram matches the real frames'.
_GRAY_PERCENTILES = np.append(np.arange(0, 100, 5), 97.5)
_GRAY_LEVELS = np.array([0, 22, 31, 41, 48, 53, 58, 64, 70, 75, 81, 87, 94, 102, 112,
                         124, 139, 155, 176, 217, 255], np.float32)


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
  """World echogenicity: tissue layers, fibre streaks, fascia bands, dark muscle bellies."""
  h, w = _WORLD
  yy = np.arange(h, dtype=np.float32)[:, None]
  xx = np.arange(w, dtype=np.float32)
  # Layers (skin, fat, muscles) with near-horizontal, gently undulating boundaries;
  # each layer has its own echo level, as muscle is darker than fat and connective tissue.
  n = int(rng.integers(5, 9))
  tops = np.sort(rng.uniform(0.0, 1.0, n) ** 1.2) * h
  curves = [y0 + rng.uniform(5, 35) * np.sin(2 * np.pi * xx / rng.uniform(300, 900)
                                              + rng.uniform(0, 2 * np.pi))
            + rng.uniform(-0.2, 0.2) * (xx - w / 2) + 6 * _smooth_noise(rng, (w,), 30.0)
            for y0 in tops]
  layer = sum((yy > c[None]).astype(np.int32) for c in curves)
  level = np.exp(rng.normal(0.0, 0.6, n + 1)).astype(np.float32)
  e = ndimage.gaussian_filter(level[layer], 3.0)
  # Fibre texture: long horizontal streaks; exp() skews it towards short bright dashes
  # on a darker ground, the look of muscle fibres and fat septa.
  streaks = _smooth_noise(rng, _WORLD, (2.2, 12.0))
  patches = _smooth_noise(rng, _WORLD, (30.0, 45.0))
  e *= np.exp(0.55 * streaks + 0.3 * patches)
  # Hypoechoic muscle bellies: large dark lens shapes with soft edges, wrapped in
  # fascia that echo most along their top and bottom (facing the beam).
  for _ in range(rng.integers(2, 5)):
    cy, cx = rng.uniform(0.2, 1.0) * h, rng.uniform(0, w)
    ry, rx = rng.uniform(30, 80), rng.uniform(50, 160)
    dy, dx = (yy - cy) / ry, (xx[None] - cx) / rx
    rho = np.hypot(dy, dx)
    e *= 1.0 - rng.uniform(0.6, 0.9) * 0.5 * (1.0 - np.tanh((rho - 1.0) / 0.24))
    facing = (dy / np.maximum(rho, 1e-3)) ** 2
    e += rng.uniform(1.0, 3.5) * facing * np.exp(-((rho - 1.05) / 0.06) ** 2)
  # Fascia: bright sheets along most layer boundaries and as free segments,
  # thick near the skin, broken along their length.
  sheets = [(c, True) for c in curves if rng.uniform() < 0.8]
  for _ in range(rng.integers(14, 24)):
    y0 = h * rng.uniform(0.0, 1.0) ** 1.2
    c = (y0 + rng.uniform(3, 25) * np.sin(2 * np.pi * xx / rng.uniform(150, 600)
                                          + rng.uniform(0, 2 * np.pi))
         + rng.uniform(-0.15, 0.15) * (xx - w / 2))
    sheets.append((c, False))
  for c, long in sheets:
    depth = float(np.clip(c.mean() / h, 0, 1))
    if long:
      x0, x1 = -w, 2 * w
    else:
      x0 = rng.uniform(-0.2, 0.9) * w
      x1 = x0 + rng.uniform(0.1, 0.6) * w
    thick = rng.uniform(2.0, 6.0) * (1.3 - 0.6 * depth)
    bright = rng.uniform(2.0, 7.0) * (1.3 - 0.6 * depth)
    along = np.clip(0.5 + 0.7 * _smooth_noise(rng, (w,), 18.0), 0, 1.4)
    ends = np.clip(np.minimum(xx - x0, x1 - xx) / 30.0, 0, 1)
    rows = slice(int(max(c.min() - 4 * thick, 0)), int(min(c.max() + 4 * thick + 1, h)))
    prof = np.exp(-((yy[rows] - c[None]) / thick) ** 2) * (along * ends)[None]
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
  # Fascicles: a few scattered bundles, each showing as a bright dash (its
  # perineurium faces the beam) beside a dark core.
  count = int(rng.integers(5, 10))
  r = np.sqrt(rng.uniform(0, 0.7, count))
  a = rng.uniform(0, 2 * np.pi, count)
  pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
  radii = rng.uniform(0.12, 0.22, count)
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
  """Blends the nerve into e_img; returns its outline mask (bool, H x W).

  Real nerves differ from the tissue around them only a little: somewhat brighter on
  average, with bright fascicle echoes inside and a partial bright arc where fascia
  wrap over them, never a closed ring or a regular pattern.
  """
  mask = np.zeros((HEIGHT, WIDTH), bool)
  got = _local_coords(n, cy, cx, scale, angle)
  if got is None:
    return mask
  sl, u, v = got
  rho, theta = np.hypot(u, v), np.arctan2(v, u)
  k, a, ph = n.harmonics.T
  boundary = 1.0 + (a[:, None, None] * np.cos(k[:, None, None] * theta
                                              + ph[:, None, None])).sum(0)
  # Fascicles: a bright dash across each bundle's top edge over a darker core.
  du = (u[..., None] - n.fascicles[:, 0]) / n.fascicle_r
  dv = (v[..., None] - n.fascicles[:, 1]) / (2.2 * n.fascicle_r)
  core = np.exp(-(du ** 2 + dv ** 2) ** 2).max(-1)
  dash = np.exp(-((du + 1.0) / 0.45) ** 2 - dv ** 4).max(-1)
  # The arc: brightest over the top of the nerve (facing the beam), fading down the
  # sides; its extent and phase vary from nerve to nerve.
  beam = np.clip(-np.cos(theta + angle + 0.3 * np.sin(ph[1])), 0, 1) ** (1.0 + a[0] * 20)
  rim = beam * (0.6 + 0.4 * np.cos(3 * theta + ph[2])) * np.exp(
      -((rho - boundary) / 0.12) ** 2)
  alpha = 1.0 / (1.0 + np.exp((rho - boundary) / 0.06))
  inner = 1.0 + 0.9 * alpha + (2.0 * dash - 0.4 * core) * alpha
  e_img[sl] *= inner ** contrast  # a power, so a raised contrast stays positive
  e_img[sl] += contrast * 4.0 * rim
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


def _render_subject(rng: np.random.Generator, frames: int, n_on: int,
                    nerve_contrast: float = 1.0) -> list[_Frame]:
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
    r = rng.uniform(12, 55)
    vessels.append(_Ellipse(_MARGIN + rng.uniform(60, 360), _MARGIN + rng.uniform(0, 580),
                            r * rng.uniform(0.5, 0.9), r, rng.uniform(-0.4, 0.4)))
  pulse_period = rng.uniform(4, 9)
  presence = _presence(rng, frames, n_on)
  # How strongly this subject's nerve stands out: rarely more than a little.
  contrast = rng.uniform(0.8, 1.2) * nerve_contrast
  atten = rng.uniform(0.6, 1.2)
  depth = np.exp(-atten * np.arange(h, dtype=np.float32) / h)[:, None]
  lateral = 1.0 - 0.12 * ((np.arange(w, dtype=np.float32) - w / 2) / (w / 2)) ** 2
  # Skin and transducer interface: thin bright lines fixed to the probe.
  skin = np.zeros((h, 1), np.float32)
  rows = np.arange(h, dtype=np.float32)[:, None]
  for y in np.sort(rng.uniform(4, 55, rng.integers(3, 6))):
    skin += rng.uniform(0.8, 2.5) * np.exp(-((rows - y) / rng.uniform(1.0, 2.5)) ** 2)
  skin[:4] += 2.0
  # This subject's gray map (the scanner's gain and curve), fitted on its first frame.
  levels = np.clip(_GRAY_LEVELS * rng.uniform(0.92, 1.08), 0, 255)
  knots = None
  out = []
  for t in range(frames):
    y0, x0 = _MARGIN + oy[t], _MARGIN + ox[t]
    e = (morph[t] * tissue_a[y0:y0 + h, x0:x0 + w]
         + (1 - morph[t]) * tissue_b[y0:y0 + h, x0:x0 + w])
    for v in vessels:
      pulse = 1.0 + 0.1 * np.sin(2 * np.pi * t / pulse_period)
      _draw_vessel(e, v, v.cy - y0, v.cx - x0, pulse)
    # The gray map is fitted without the nerve, so the nerve's contrast leaves the
    # rest of the subject's frames unchanged.
    nerve_free = e + skin if knots is None else None
    mask = np.zeros((h, w), bool)
    if presence[t] > 0:
      m = _draw_nerve(e, nerve, nerve.cy - y0, nerve.cx - x0, 1.0 + n_wob[t],
                      nerve.angle + n_rot[t], contrast * float(presence[t]))
      if presence[t] >= 0.5:
        mask = m
    e = e + skin
    # Speckle: magnitude of smoothed complex Gaussian noise (Rayleigh), grains wider
    # than tall as in B-mode. Two looks are summed incoherently, as a compounding
    # scanner does, which removes the Rayleigh's black zero-lines.
    z = ndimage.gaussian_filter(rng.standard_normal((4, h, w)).astype(np.float32),
                                (0, 2.0, 4.5))
    # The scanner's speckle reduction leaves only part of its contrast.
    speckle = np.sqrt((z ** 2).sum(0))
    speckle = 0.4 + 0.6 * speckle / speckle.mean()
    log_i = np.log(e * depth * lateral * speckle + 1e-3)
    if knots is None:
      free = np.log(nerve_free * depth * lateral * speckle + 1e-3)
      knots = np.percentile(free[::3, ::3], _GRAY_PERCENTILES)
    img = np.interp(log_i, knots, levels).astype(np.uint8)
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
               test_subjects: int = 2, seed: int = 0,
               nerve_contrast: float = 1.0) -> pathlib.Path:
  """Writes a synthetic Kaggle-layout tree into out_dir and returns its path.

  Deterministic in (subjects, frames, test_subjects, seed). out_dir must be absent or
  empty, so a previous tree is never silently mixed with a new one. nerve_contrast
  scales how far the nerve stands out: 1 is as subtle as in real frames; tiny test
  runs that must find the nerve within a few steps raise it.
  """
  if nerve_contrast < 0:
    raise ValueError(f"write_tree: need nerve_contrast >= 0; got {nerve_contrast}")
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
      sub = _render_subject(rng, frames, int(n_on[s - 1]), nerve_contrast)
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
    test += _render_subject(np.random.default_rng([seed, 1, s]), frames, int(n_on[s]),
                            nerve_contrast)
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
