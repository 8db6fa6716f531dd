"""A self-contained HTML report: overlays, and with ground truth the worst and best
frames and a Dice histogram. Images are inlined as base64 PNG, so the page is one
file that opens anywhere, offline.

Frames are added one at a time and only thumbnails of the frames shown are kept, so a
report over thousands of frames needs little memory.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import pathlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nerveseg_jax import imageio
from nerveseg_jax import workdir as workdir_lib
from nerveseg_jax.postprocess import NO_NERVE


@dataclasses.dataclass
class _Thumb:
  name: str
  png: bytes
  caption: str
  dice: float | None
  has_truth_nerve: bool


def _thumbnail(rgb: np.ndarray, width: int) -> np.ndarray:
  h, w = rgb.shape[:2]
  if w <= width:
    return rgb
  size = (width, max(1, round(h * width / w)))
  return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def histogram_png(values: np.ndarray, nerve: np.ndarray | None = None, *, bins: int = 20,
                  width: int = 520, height: int = 240) -> bytes:
  """A bar chart of values in [0, 1] drawn with PIL, stacked by nerve / no-nerve frames."""
  values = np.asarray(values, np.float64)
  nerve = np.ones(values.shape, bool) if nerve is None else np.asarray(nerve, bool)
  edges = np.linspace(0.0, 1.0, bins + 1)
  counts = [np.histogram(values[sel], edges)[0] for sel in (nerve, ~nerve)]
  top = max(1, int((counts[0] + counts[1]).max()))
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  left, right, bottom, upper = 40, width - 10, height - 30, 12
  scale = (bottom - upper) / top
  bar = (right - left) / bins
  colors = ((46, 125, 50), (158, 158, 158))  # nerve frames green, empty frames grey
  for b in range(bins):
    y = bottom
    for count, color in zip((counts[0][b], counts[1][b]), colors):
      if count:
        h = count * scale
        draw.rectangle([left + b * bar + 1, y - h, left + (b + 1) * bar - 1, y], fill=color)
        y -= h
  draw.line([left, bottom, right, bottom], fill="black")
  draw.line([left, upper, left, bottom], fill="black")
  for x in (0.0, 0.25, 0.5, 0.75, 1.0):
    px = left + x * (right - left)
    draw.line([px, bottom, px, bottom + 4], fill="black")
    draw.text((px - 10, bottom + 8), f"{x:.2f}", fill="black")
  draw.text((4, upper - 4), str(top), fill="black")
  draw.text((4, bottom - 10), "0", fill="black")
  return imageio.png_bytes(np.asarray(img))


class ReportBuilder:
  """Collects frames and writes report.html.

  Args:
    title: page heading.
    grid_size: how many frames the overlay grid shows (the first ones added).
    extremes: how many worst and best frames to show when Dice is known.
    thumb_width: thumbnail width in pixels.
  """

  def __init__(self, title: str, *, grid_size: int = 48, extremes: int = 8,
               thumb_width: int = 290):
    self.title = title
    self.grid_size = grid_size
    self.extremes = extremes
    self.thumb_width = thumb_width
    self._grid: list[_Thumb] = []
    self._worst: list[_Thumb] = []
    self._best: list[_Thumb] = []
    self._dice: list[float] = []
    self._nerve: list[bool] = []
    self.num_frames = 0

  def add(self, name: str, image: np.ndarray, mask: np.ndarray, presence: float,
          decision: bool, truth: np.ndarray | None = None,
          dice: float | None = None) -> None:
    """Adds one frame: gray image, predicted 0/1 mask, and optionally its truth and Dice."""
    self.num_frames += 1
    if dice is not None:
      self._dice.append(float(dice))
      self._nerve.append(bool(truth is not None and np.any(truth)))
    want_grid = len(self._grid) < self.grid_size
    want_worst = dice is not None and (len(self._worst) < self.extremes
                                       or dice < self._worst[-1].dice)
    # Best: frames with a nerve that was found at least in part, so that the section
    # never fills with Dice 0 frames when few nerves were found.
    want_best = dice is not None and dice > 0 and truth is not None and np.any(truth) and (
        len(self._best) < self.extremes or dice > self._best[-1].dice)
    if not (want_grid or want_worst or want_best):
      return  # render only what is shown
    area = int(np.count_nonzero(mask))
    caption = (f"presence {presence:.2f} · area {area} px" if decision
               else f"{NO_NERVE} · presence {presence:.2f}")
    if dice is not None:
      caption += f" · Dice {dice:.3f}"
    rgb = _thumbnail(imageio.overlay(image, mask if decision else None, truth),
                     self.thumb_width)
    thumb = _Thumb(name, imageio.png_bytes(rgb), caption, dice,
                   bool(truth is not None and np.any(truth)))
    if want_grid:
      self._grid.append(thumb)
    if want_worst:
      self._worst = sorted(self._worst + [thumb], key=lambda t: t.dice)[:self.extremes]
    if want_best:
      self._best = sorted(self._best + [thumb], key=lambda t: -t.dice)[:self.extremes]

  def _figure(self, t: _Thumb) -> str:
    data = base64.b64encode(t.png).decode("ascii")
    cls = "no" if NO_NERVE in t.caption else "yes"
    return (f'<figure><img alt="{html.escape(t.name)}" src="data:image/png;base64,{data}">'
            f'<figcaption><b>{html.escape(t.name)}</b><br><span class="{cls}">'
            f"{html.escape(t.caption)}</span></figcaption></figure>")

  def _section(self, heading: str, thumbs: list[_Thumb], note: str = "") -> str:
    if not thumbs:
      return ""
    note = f"<p>{html.escape(note)}</p>" if note else ""
    figures = "".join(self._figure(t) for t in thumbs)
    return f'<h2>{html.escape(heading)}</h2>{note}<div class="grid">{figures}</div>'

  def render(self, summary: dict[str, Any] | None = None, *,
             about: dict[str, Any] | None = None,
             calibration: dict[str, Any] | None = None,
             compare: dict[str, dict[str, Any]] | None = None) -> str:
    """The page as a string.

    Args:
      summary: further facts, one table row each.
      about: what was evaluated (run, checkpoint step, split ...), shown first.
      calibration: the post-processing settings used (Calibration.to_dict()).
      compare: metrics (evaluate.summarize's dict) by column name, side by side,
        e.g. {"uncalibrated": ..., "calibrated": ...}.
    """
    parts = [f"<h1>{html.escape(self.title)}</h1>"]
    if about:
      parts.append(_table(about, "about"))
    if compare:
      parts.append("<h2>Metrics</h2>" + _compare_table(compare))
    if calibration:
      parts.append("<h2>Post-processing settings used</h2>" + _calibration_table(calibration))
    if summary:
      parts.append(("<h2>Details</h2>" if about or compare else "") + _table(summary))
    legend = ("Green: predicted mask outline. Yellow: ground-truth outline."
              if self._dice else "Green: predicted mask outline.")
    parts.append(f"<p class='legend'>{legend}</p>")
    if self._dice:
      dice = np.array(self._dice)
      png = base64.b64encode(histogram_png(dice, np.array(self._nerve))).decode("ascii")
      parts.append(
          f"<h2>Dice per frame ({len(dice)} frames, mean {dice.mean():.4f})</h2>"
          f'<img alt="Dice histogram" src="data:image/png;base64,{png}">'
          "<p class='legend'>Green: frames with a nerve; grey: frames without "
          "(Dice 1 when both prediction and truth are empty, else 0).</p>")
      parts.append(self._section("Worst frames", self._worst))
      if self._best:
        parts.append(self._section("Best frames with a nerve", self._best))
      elif any(self._nerve):
        parts.append("<h2>Best frames with a nerve</h2><p>None: no frame with a nerve "
                     "has a Dice above 0.</p>")
    shown = len(self._grid)
    parts.append(self._section(
        "Overlays", self._grid,
        f"First {shown} of {self.num_frames} frames." if shown < self.num_frames else ""))
    body = "\n".join(p for p in parts if p)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>\n")

  def write(self, path: str | pathlib.Path, summary: dict[str, Any] | None = None,
            **sections: Any) -> pathlib.Path:
    """Writes the page (see render for `sections`)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_text_atomic(path, self.render(summary, **sections))
    return path


# What each calibration setting does, in the words of postprocess.apply.
_CALIBRATION_ROWS = (
    ("mask_threshold", "Mask threshold", "a pixel is nerve when its probability is above this"),
    ("presence_threshold", "Presence threshold",
     "a nerve is reported only when the presence probability is above this "
     "(0: the mask area alone decides)"),
    ("min_area", "Minimum area", "smaller masks are reported as no nerve (pixels)"),
    ("largest_component", "Largest region only",
     "keep only the largest connected region of the mask"),
)
_METRIC_ROWS = (
    ("kaggle_score", "Kaggle score (mean Dice, empty on empty = 1)"),
    ("dice_nerve_frames", "Dice on frames with a nerve"),
    ("presence_precision", "Presence precision"),
    ("presence_recall", "Presence recall"),
)
_CONFUSION_ROWS = ("true_positive", "false_positive", "false_negative", "true_negative")


def _table(rows: dict[str, Any], cls: str = "") -> str:
  body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                 for k, v in rows.items())
  return f"<table class='{cls}'>{body}</table>" if cls else f"<table>{body}</table>"


def _calibration_table(cal: dict[str, Any]) -> str:
  rows = []
  for key, label, meaning in _CALIBRATION_ROWS:
    if key in cal:
      value = cal[key]
      value = ("yes" if value else "no") if isinstance(value, bool) else _fmt(value)
      rows.append(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td>"
                  f"<td class='note'>{html.escape(meaning)}</td></tr>")
  rows += [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td><td></td></tr>"
           for k, v in cal.items() if k not in {r[0] for r in _CALIBRATION_ROWS}]
  return ("<table class='calibration'><tr><th>setting</th><th>value</th><th>meaning</th>"
          f"</tr>{''.join(rows)}</table>")


def _compare_table(columns: dict[str, dict[str, Any]]) -> str:
  head = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
  rows = []
  for key, label in _METRIC_ROWS:
    cells = "".join(f"<td>{html.escape(_fmt(m.get(key)))}</td>" for m in columns.values())
    rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
  for key in _CONFUSION_ROWS:
    cells = "".join(f"<td>{html.escape(_fmt((m.get('confusion') or {}).get(key)))}</td>"
                    for m in columns.values())
    rows.append(f"<tr><th>{html.escape(key.replace('_', ' '))}</th>{cells}</tr>")
  return f"<table class='compare'><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def evaluation_sections(out: dict[str, Any]) -> dict[str, Any]:
  """The report's sections from evaluate.run's result: what was evaluated, the metrics
  before and after calibration side by side, and the settings used."""
  about = {"Run (workdir)": out["workdir"],
           "Checkpoint": f"step {out.get('checkpoint_step', 'n/a')} ({out['checkpoint']})",
           "Split": out["source"].removeprefix("split ")}
  if out.get("classifier_workdir"):
    about["Presence decided by"] = f"classifier {out['classifier_workdir']}"
  if out.get("tta"):
    about["Test-time augmentation"] = "horizontal flip"
  if "before_calibration" in out:
    first = "before" if out.get("classifier_workdir") else "uncalibrated (defaults)"
    compare = {first: out["before_calibration"], "calibrated": out["metrics"]}
  else:
    compare = {out.get("calibration_source", "score"): out["metrics"]}
  summary = {"frames": out["metrics"]["num_frames"],
             "frames with a nerve": out["metrics"]["num_nerve_frames"]}
  if "calibration_search" in out:
    summary["calibration saved to"] = out["calibration_search"]["saved"]
  if out.get("skipped"):
    summary["skipped files"] = ", ".join(pathlib.Path(f["file"]).name for f in out["skipped"])
  return dict(summary=summary, about=about, calibration=out["calibration"], compare=compare)


def _fmt(v: Any) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.4f}"
  return str(v)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}
th{background:#f4f4f4;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:290px}figure img{width:100%;display:block;image-rendering:auto}
figcaption{font-size:.8em;padding:.2em 0}
.no{color:#777}.yes{color:#2e7d32}.legend{font-size:.85em;color:#555}
.note{color:#555;font-size:.85em}.compare td{text-align:right;font-variant-numeric:tabular-nums}
.about th{background:none}
"""
