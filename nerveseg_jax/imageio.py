"""Image files in and out: reading frames of any size and format, overlays, PNG output.

Frames are read as 8-bit grayscale (H, W) uint8, the form every model here takes:
ultrasound is grayscale, and RGB files (screenshots, JPEG conversions) carry the same
intensity in every channel. Every read error names the file.
"""

from __future__ import annotations

import io
import pathlib
import re
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
# Overlay colours: green outline for the prediction, yellow for the ground truth.
PRED_COLOR = (0, 255, 0)
TRUTH_COLOR = (255, 220, 0)


class ImageReadError(ValueError):
  """A file that is not a readable image; the message names the file."""


def _to_gray_uint8(image: Image.Image, name: str) -> np.ndarray:
  """Converts a decoded PIL image of any mode to a (H, W) uint8 array."""
  mode = image.mode
  if mode in ("L", "1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr"):
    return np.asarray(image.convert("L"), dtype=np.uint8)
  if mode.startswith("I;16") or mode in ("I", "F"):
    # 16-bit / 32-bit scans: rescale to 8 bits by the type's range (never by the
    # frame's own maximum, which would change contrast from frame to frame).
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    return np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8)
  raise ImageReadError(f"{name}: unsupported image mode {mode!r}")


def decode_gray(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes encoded image bytes (tif, png, jpg, ...) to a (H, W) uint8 gray frame.

  Raises ImageReadError naming `name` for anything that is not a complete image.
  """
  if not data:
    raise ImageReadError(f"{name}: empty file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PIL warns on damaged metadata; we raise instead
      with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode fully now so truncated files fail here, not later
        array = _to_gray_uint8(image, name)  # a multi-page TIFF gives its first page
  except ImageReadError:
    raise
  except UnidentifiedImageError:
    raise ImageReadError(
        f"{name}: not a recognised image (tif, png or jpg), or its header is corrupt") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageReadError(f"{name}: corrupt or unreadable image ({e})") from None
  if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
    raise ImageReadError(f"{name}: decoded to an unusable shape {array.shape}")
  return array


def read_gray(path: str | pathlib.Path) -> np.ndarray:
  """Reads one image file as a (H, W) uint8 gray frame; errors name the file."""
  path = pathlib.Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from None
  return decode_gray(data, str(path))


def binarize_mask(gray: np.ndarray) -> np.ndarray:
  """A decoded (H, W) uint8 mask as 0/1: the one rule for every mask read from a file.

  0/255 masks and lossy (JPEG) masks are thresholded at half range (128); masks saved
  as 0/1 (max value 1) at 1, so that they do not silently read as empty.
  """
  gray = np.asarray(gray)
  return (gray >= (128 if gray.max(initial=0) > 1 else 1)).astype(np.uint8)


def read_mask(path: str | pathlib.Path) -> np.ndarray:
  """Reads a mask file as (H, W) uint8 0/1 (see binarize_mask)."""
  return binarize_mask(read_gray(path))


def is_image_file(path: pathlib.Path) -> bool:
  return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def is_mask_name(path: pathlib.Path) -> bool:
  """Kaggle names masks NAME_mask.tif; they are labels, not frames to segment."""
  return path.stem.endswith("_mask")


def natural_key(name: str) -> tuple:
  """Sort key that orders '2' before '10' and '1_2' before '1_10'."""
  return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
               for part in re.split(r"(\d+)", name) if part)


def list_inputs(path: str | pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """Lists the frames to process under `path` (a folder, not recursive, or one file).

  Returns (images, ignored): image files in natural order, and the other files of the
  folder (non-image suffixes, Kaggle *_mask files, hidden files such as .DS_Store or
  ._1.tif) so callers can count them.
  """
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"--images: {path} does not exist")
  if path.is_file():
    return [path], []
  files = sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
  images = [p for p in files
            if is_image_file(p) and not is_mask_name(p) and not p.name.startswith(".")]
  ignored = [p for p in files if p not in images]
  return images, ignored


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
  """Boolean boundary pixels of a (H, W) mask: in the mask, next to a non-mask pixel."""
  m = np.asarray(mask) != 0
  inner = m.copy()
  for _ in range(thickness):
    padded = np.pad(inner, 1, mode="constant", constant_values=False)
    inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
             & padded[1:-1, :-2] & padded[1:-1, 2:])
  return m & ~inner


def caption_band(rgb: np.ndarray, text: str) -> np.ndarray:
  """Writes `text` in a darkened band across the top of an (H, W, 3) uint8 image.

  PIL's built-in bitmap font (no font files needed), drawn at a size that grows with
  the frame so it stays legible on large frames; on narrow frames the " | " parts go on
  lines of their own. The frame keeps its size, so an overlay still lines up pixel for
  pixel with its frame and mask.
  """
  rgb = np.array(rgb, dtype=np.uint8)
  h, w = rgb.shape[:2]
  font = ImageFont.load_default_imagefont()
  width = lambda line: font.getbbox(line)[2] + 8
  lines = [text] if width(text) <= w else text.split(" | ")
  scale = max(1, min(round(w / 300), w // max(width(line) for line in lines)))
  line_h = font.getbbox("Ag")[3] + 2
  small = Image.new("L", (-(-w // scale), line_h * len(lines) + 4), 0)
  draw = ImageDraw.Draw(small)
  for i, line in enumerate(lines):
    draw.text((4, 2 + i * line_h), line, fill=255, font=font)
  band_h = min(h, small.height * scale)
  ink = np.asarray(small.resize((small.width * scale, small.height * scale),
                                Image.Resampling.NEAREST))[:band_h, :w] > 127
  band = rgb[:band_h].astype(np.float32) * 0.3  # darkened, so any frame shows the text
  band[ink] = 255.0
  rgb[:band_h] = band.astype(np.uint8)
  return rgb


def overlay(image: np.ndarray, mask: np.ndarray | None = None,
            truth: np.ndarray | None = None, caption: str | None = None) -> np.ndarray:
  """Draws mask outlines on a gray frame; returns (H, W, 3) uint8.

  The prediction is drawn in green with a light tint inside, the ground truth (when
  given) as a yellow outline, so both stay visible where they overlap. `caption` (see
  postprocess.caption) is written across the top, so a frame judged empty never looks
  like the raw frame.
  """
  gray = np.asarray(image)
  if gray.ndim == 3:
    gray = gray[..., 0]
  rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
  # Lines scale with the frame so that they stay visible on large frames.
  thickness = max(1, round(max(gray.shape) / 300))
  if truth is not None:
    rgb[outline(truth, thickness)] = TRUTH_COLOR
  if mask is not None:
    m = np.asarray(mask) != 0
    rgb[m] = 0.75 * rgb[m] + 0.25 * np.array(PRED_COLOR, np.float32)
    rgb[outline(m, thickness)] = PRED_COLOR
  rgb = np.clip(rgb, 0, 255).astype(np.uint8)
  return caption_band(rgb, caption) if caption else rgb


def png_bytes(array: np.ndarray) -> bytes:
  """Encodes a (H, W) or (H, W, 3) uint8 array as PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def write_png(path: str | pathlib.Path, array: np.ndarray) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(png_bytes(array))


def mask_png(mask: np.ndarray) -> np.ndarray:
  """A 0/1 mask as a viewable 0/255 image (what OUT/masks/NAME.png holds)."""
  return (np.asarray(mask) != 0).astype(np.uint8) * 255
