"""Image files in and out: reading frames of any size, overlays, PNG output.

Frames are read as 8-bit grayscale (H, W) uint8, the form every model here takes:
ultrasound is grayscale, and RGB files (screenshots, JPEG conversions) carry the same
intensity in every channel. Every read error names the file.

Only TIFF, PNG and JPEG are decoded, recognised by their signature (never by the file
name): Pillow's other decoders are not reachable from here, among them EPS, which it
hands to Ghostscript. The pixel count is checked from the header before any pixel is
decoded, so a small file that declares a huge image costs nothing.
"""

from __future__ import annotations

import io
import pathlib
import re
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from scipy import ndimage

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
# The decoders Image.open may pick from; the signature decides, not the suffix.
FORMATS = ("TIFF", "PNG", "JPEG")
# Overlay colours: green outline for the prediction, yellow for the ground truth.
PRED_COLOR = (0, 255, 0)
TRUTH_COLOR = (255, 220, 0)
_CROSS = ndimage.generate_binary_structure(2, 1)   # 4-connected neighbours


class ImageReadError(ValueError):
  """A file that is not a readable image; the message names the file."""


class ImageTooLarge(ImageReadError):
  """An image whose header declares more pixels than allowed (a decompression bomb)."""


def _to_gray_uint8(image: Image.Image, name: str) -> np.ndarray:
  """Converts a decoded PIL image of any mode to a (H, W) uint8 array."""
  mode = image.mode
  if mode == "L":
    return np.asarray(image, dtype=np.uint8)
  if mode in ("1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr"):
    return np.asarray(image.convert("L"), dtype=np.uint8)
  if mode.startswith("I;16") or mode in ("I", "F"):
    # 16-bit / 32-bit scans: rescale to 8 bits by the type's range (never by the
    # frame's own maximum, which would change contrast from frame to frame).
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    return np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8)
  raise ImageReadError(f"{name}: unsupported image mode {mode!r}")


def decode_gray(data: bytes, name: str = "<bytes>", *, max_pixels: int | None = None,
                limit_hint: str = "") -> np.ndarray:
  """Decodes TIFF, PNG or JPEG bytes to a (H, W) uint8 gray frame.

  Args:
    data: the encoded file.
    name: names the file in errors.
    max_pixels: the most pixels (width x height) accepted, checked on the header
      before decoding; None leaves only Pillow's own guard (Image.MAX_IMAGE_PIXELS).
    limit_hint: appended to the too-large message (e.g. the option that sets it).

  Raises ImageTooLarge over max_pixels (or Pillow's guard), and ImageReadError naming
  `name` for anything else that is not a complete TIFF, PNG or JPEG image.
  """
  if not data:
    raise ImageReadError(f"{name}: empty file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PIL warns on damaged metadata; we raise instead
      with Image.open(io.BytesIO(data), formats=FORMATS) as image:
        width, height = image.size   # open reads only the header
        if max_pixels is not None and width * height > max_pixels:
          raise ImageTooLarge(
              f"{name}: image too large: {width}x{height} = {width * height:,} pixels, "
              f"the limit is {max_pixels:,}{limit_hint}")
        image.load()  # decode fully now so truncated files fail here, not later
        array = _to_gray_uint8(image, name)  # a multi-page TIFF gives its first page
  except ImageReadError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageTooLarge(f"{name}: image too large ({e})") from None
  except UnidentifiedImageError:
    raise ImageReadError(
        f"{name}: not a recognised image (TIFF, PNG or JPEG), or its header is corrupt") from None
  except (OSError, ValueError, SyntaxError) as e:
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


def _bbox_slices(m: np.ndarray) -> tuple[slice, slice] | None:
  """The bounding box of a boolean (H, W) array's True pixels as slices; None if none."""
  rows = np.flatnonzero(m.any(axis=1))
  if rows.size == 0:
    return None
  cols = np.flatnonzero(m.any(axis=0))
  return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
  """Boolean boundary pixels of a (H, W) mask: in the mask, within `thickness` steps
  (4-connected) of a non-mask pixel or the frame's edge."""
  m = np.asarray(mask) != 0
  out = np.zeros(m.shape, bool)
  box = _bbox_slices(m)
  if box is None:
    return out
  # Only the mask's bounding box can hold boundary pixels, and everything around it is
  # background, which is what the erosion assumes beyond its input's edge (border 0):
  # eroding the box alone gives the same pixels, at a cost that follows the mask, not the
  # frame.
  sub = m[box]
  inner = ndimage.binary_erosion(sub, structure=_CROSS, iterations=thickness, border_value=0)
  np.logical_not(inner, out=inner)
  np.logical_and(sub, inner, out=out[box])
  return out


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
  like the raw frame. All in uint8 and a channel at a time: a float copy of a large
  frame would cost 12 bytes a pixel.
  """
  gray = np.asarray(image)
  if gray.ndim == 3:
    gray = gray[..., 0]
  rgb = np.repeat(gray[..., None].astype(np.uint8, copy=False), 3, axis=-1)
  # Lines scale with the frame so that they stay visible on large frames.
  thickness = max(1, round(max(gray.shape) / 300))
  if truth is not None:
    rgb[outline(truth, thickness)] = TRUTH_COLOR
  if mask is not None:
    m = np.asarray(mask) != 0
    box = _bbox_slices(m)
    if box is not None:  # tinted inside, within the mask's bounding box only
      inside = m[box]
      for channel, color in zip(np.moveaxis(rgb[box], -1, 0), PRED_COLOR):
        # 0.75 * value + 0.25 * colour, rounded down: exact in integers.
        channel[inside] = (3 * channel[inside].astype(np.uint16) + color) // 4
    rgb[outline(m, thickness)] = PRED_COLOR
  return caption_band(rgb, caption) if caption else rgb


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
  """Encodes a (H, W) or (H, W, 3) uint8 array as PNG bytes.

  compress_level: zlib's 0-9; 1 is about 4x faster than the default 6 on an overlay
  for a few percent more bytes, the better trade for images sent and then dropped.
  """
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
      buffer, format="PNG", compress_level=compress_level)
  return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))


def png_bytes_fast(array: np.ndarray) -> bytes:
  """A (H, W) or (H, W, 3) uint8 array as PNG bytes, written for speed, not size.

  For images shown once and dropped (the web page's): every row unfiltered and zlib at
  level 1. Pillow, even at level 1, picks each row's filter by trying all five, which
  on a 420x580 frame costs as much as the compression; skipping it makes encoding
  about 1.5-2x faster for 0-20 % more bytes. Any PNG decoder reads the same pixels.
  zlib releases the GIL while it compresses, so other threads run meanwhile.
  """
  a = np.asarray(array)
  if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
    raise ValueError(f"png_bytes_fast expects (H, W) or (H, W, 3) uint8; got {a.dtype} "
                     f"{a.shape}")
  h, w = a.shape[:2]
  if h < 1 or w < 1:
    raise ValueError(f"png_bytes_fast: empty image {a.shape}")
  rows = np.empty((h, 1 + w * (1 if a.ndim == 2 else 3)), np.uint8)
  rows[:, 0] = 0                                   # filter type 0 (none) on every row
  rows[:, 1:] = a.reshape(h, -1)
  color_type = 0 if a.ndim == 2 else 2             # gray or RGB, 8 bits a sample
  header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
  return b"".join((b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
                   _png_chunk(b"IDAT", zlib.compress(rows.data, 1)),
                   _png_chunk(b"IEND", b"")))


def write_png(path: str | pathlib.Path, array: np.ndarray) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(png_bytes(array))


def mask_png(mask: np.ndarray) -> np.ndarray:
  """A 0/1 mask as a viewable 0/255 image (what OUT/masks/NAME.png holds)."""
  out = (np.asarray(mask) != 0).view(np.uint8)
  return out * np.uint8(255)
