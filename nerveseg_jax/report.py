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
    want_best = dice is not None and truth is not None and np.any(truth) and (
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

  def render(self, summary: dict[str, Any] | None = None) -> str:
    """The page as a string."""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in (summary or {}).items())
    parts = [f"<h1>{html.escape(self.title)}</h1>"]
    if rows:
      parts.append(f"<table>{rows}</table>")
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
      parts.append(self._section("Best frames with a nerve", self._best))
    shown = len(self._grid)
    parts.append(self._section(
        "Overlays", self._grid,
        f"First {shown} of {self.num_frames} frames." if shown < self.num_frames else ""))
    body = "\n".join(p for p in parts if p)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>\n")

  def write(self, path: str | pathlib.Path, summary: dict[str, Any] | None = None
            ) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_text_atomic(path, self.render(summary))
    return path


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
"""
