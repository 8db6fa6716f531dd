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


def test_best_frames_are_nerve_frames_with_some_overlap(tmp_path):
  """Best frames never fill with Dice 0: empty frames (Dice 1) and missed nerves are out."""
  builder = report.ReportBuilder("Evaluation", grid_size=0, extremes=3)
  empty = np.zeros((42, 58), np.uint8)
  for i in range(4):                                  # empty frames, correctly empty: Dice 1
    builder.add(f"e{i}", _frame(i)[0], empty, 0.1, False, truth=empty, dice=1.0)
  for i in range(3):                                  # nerves all missed: Dice 0
    image, truth = _frame(10 + i)
    builder.add(f"m{i}", image, empty, 0.2, False, truth=truth, dice=0.0)
  page = builder.render()
  assert "None: no frame with a nerve has a Dice above 0." in page
  best = page[page.index("Best frames with a nerve"):]
  assert not re.findall(r"<b>(\w+)</b>", best)
  image, truth = _frame(20)
  builder.add("hit", image, truth, 0.9, True, truth=truth, dice=0.4)
  best = builder.render()
  best = best[best.index("Best frames with a nerve"):]
  assert re.findall(r"<b>(\w+)</b>", best) == ["hit"]


def _out(**extra):
  metrics = dict(kaggle_score=0.81, dice_nerve_frames=0.62, presence_precision=0.9,
                 presence_recall=0.7, confusion=dict(true_positive=7, false_positive=1,
                                                     false_negative=3, true_negative=9),
                 num_frames=20, num_nerve_frames=10)
  before = dict(metrics, kaggle_score=0.55, dice_nerve_frames=0.6,
                confusion=dict(true_positive=9, false_positive=8, false_negative=1,
                               true_negative=2))
  out = dict(workdir="/runs/unet_kaggle", source="split val", checkpoint="best",
             checkpoint_step=4200, tta=False, classifier_workdir=None, metrics=metrics,
             before_calibration=before, calibration=dict(
                 mask_threshold=0.45, presence_threshold=0.625, min_area=1218,
                 largest_component=True),
             calibration_search=dict(saved="/runs/unet_kaggle/calibration.json"), skipped=[])
  out.update(extra)
  return out


def _cells(table_html: str) -> list[list[str]]:
  return [re.findall(r"<t[hd][^>]*>([^<]*)</t[hd]>", row)
          for row in re.findall(r"<tr>(.*?)</tr>", table_html)]


def test_evaluation_report_names_the_run_and_compares_before_and_after(tmp_path):
  builder = report.ReportBuilder("Evaluation")
  page = builder.write(tmp_path / "r.html", **report.evaluation_sections(_out())).read_text()
  about = _cells(re.search(r"<table class='about'>(.*?)</table>", page).group(1))
  assert ["Run (workdir)", "/runs/unet_kaggle"] in about
  assert ["Checkpoint", "step 4200 (best)"] in about
  assert ["Split", "val"] in about
  compare = _cells(re.search(r"<table class='compare'>(.*?)</table>", page).group(1))
  assert compare[0] == ["", "uncalibrated (defaults)", "calibrated"]
  rows = {r[0]: r[1:] for r in compare[1:]}
  assert rows["Kaggle score (mean Dice, empty on empty = 1)"] == ["0.5500", "0.8100"]
  assert rows["false positive"] == ["8", "1"]
  # The calibration is a table of settings, never a Python dict.
  assert "{'mask_threshold'" not in page and "mask_threshold':" not in page
  cal = _cells(re.search(r"<table class='calibration'>(.*?)</table>", page).group(1))
  values = {r[0]: r[1] for r in cal[1:]}
  assert values == {"Mask threshold": "0.4500", "Presence threshold": "0.6250",
                    "Minimum area": "1218", "Largest region only": "yes"}


def test_evaluation_report_without_calibration_search_has_one_column():
  out = _out(source="folder /data/frames", calibration_source="/runs/x/calibration.json")
  del out["before_calibration"], out["calibration_search"]
  page = report.ReportBuilder("E").render(**report.evaluation_sections(out))
  compare = _cells(re.search(r"<table class='compare'>(.*?)</table>", page).group(1))
  assert compare[0] == ["", "/runs/x/calibration.json"]
  assert ["Split", "folder /data/frames"] in _cells(page)


def test_caption_states_decision_presence_and_dice():
  from nerveseg_jax import postprocess
  assert postprocess.caption(False, 0.1234) == "No nerve found | presence 12.3%"
  assert postprocess.caption(True, 0.87, 0.8123) == "Nerve found | presence 87.0% | Dice 0.812"


def test_no_nerve_overlay_is_not_the_raw_frame():
  """A frame judged empty still carries its verdict, so it never looks like the raw frame."""
  from nerveseg_jax import postprocess
  image, _ = _frame(3, h=120, w=160)
  raw = imageio.overlay(image)
  captioned = imageio.overlay(image, None, caption=postprocess.caption(False, 0.2))
  assert captioned.shape == raw.shape                  # still aligned with frame and mask
  changed = np.any(captioned != raw, axis=-1)
  assert changed.any()
  rows = np.flatnonzero(changed.any(axis=1))
  assert rows.max() < 40                               # only the band at the top
  # Different verdicts write different text.
  other = imageio.overlay(image, None, caption=postprocess.caption(False, 0.9))
  assert np.any(other != captioned)
