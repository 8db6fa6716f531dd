"""The HTML report and overlays: self-contained, worst/best ordering, histogram."""

import base64
import io
import re

import numpy as np
from PIL import Image

from nerveseg_jax import imageio, report


def _frame(seed, h=42, w=58):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 255, (h, w), dtype=np.uint8)
  yy, xx = np.mgrid[:h, :w]
  truth = ((yy - 20) ** 2 + (xx - 30) ** 2 <= 64).astype(np.uint8)
  return image, truth


def test_overlay_draws_outlines_only_on_the_boundary():
  image, truth = _frame(0)
  rgb = imageio.overlay(image, truth, truth)
  assert rgb.shape == image.shape + (3,) and rgb.dtype == np.uint8
  edge = imageio.outline(truth)
  assert edge.sum() > 0 and not edge[20, 30]          # centre is inside, not on the outline
  np.testing.assert_array_equal(rgb[edge], np.tile(imageio.PRED_COLOR, (edge.sum(), 1)))
  far = (slice(0, 5), slice(0, 5))                     # untouched background stays gray
  np.testing.assert_array_equal(rgb[far][..., 0], image[far])
  np.testing.assert_array_equal(rgb[far][..., 1], image[far])


def test_report_is_self_contained_and_orders_extremes(tmp_path):
  builder = report.ReportBuilder("Evaluation", grid_size=3, extremes=2)
  dices = [0.9, 0.1, 0.5, 0.95, 0.0, 0.7]
  for i, d in enumerate(dices):
    image, truth = _frame(i)
    builder.add(f"f{i}", image, truth, presence=0.8, decision=d > 0.05, truth=truth, dice=d)
  path = builder.write(tmp_path / "report.html", {"kaggle_score": 0.5, "frames": 6})
  page = path.read_text()
  assert "http://" not in page and "https://" not in page     # nothing fetched
  assert "kaggle_score" in page and "0.5000" in page
  assert "No nerve found" in page                             # f4 is reported as empty
  sections = {m.group(1): m.start() for m in re.finditer(r"<h2>([^<(]+)", page)}
  worst = page[sections["Worst frames"]:sections["Best frames with a nerve"]]
  best = page[sections["Best frames with a nerve"]:sections["Overlays"]]
  assert re.findall(r"<b>(f\d)</b>", worst) == ["f4", "f1"]
  assert re.findall(r"<b>(f\d)</b>", best) == ["f3", "f0"]
  grid = page[sections["Overlays"]:]
  assert re.findall(r"<b>(f\d)</b>", grid) == ["f0", "f1", "f2"]
  assert "First 3 of 6 frames" in grid
  # Every inlined image decodes as a PNG.
  images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
  assert len(images) == 1 + 2 + 2 + 3                          # histogram + sections
  for data in images:
    assert Image.open(io.BytesIO(base64.b64decode(data))).format == "PNG"


def test_histogram_bar_heights_follow_counts():
  values = np.array([0.02] * 6 + [0.97] * 3)
  png = report.histogram_png(values, np.array([True] * 9), bins=10, width=220, height=130)
  img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  green = np.all(img == (46, 125, 50), axis=-1)
  cols = np.flatnonzero(green.any(axis=0))
  left_h = green[:, cols[0]].sum()
  right_h = green[:, cols[-1]].sum()
  assert abs(left_h / right_h - 2.0) < 0.1                     # 6 vs 3 frames
