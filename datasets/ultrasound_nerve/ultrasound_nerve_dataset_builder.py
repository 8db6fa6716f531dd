"""TFDS builder for the Kaggle Ultrasound Nerve Segmentation (2016) data.

Configs:
  kaggle  (default) the competition download in manual_dir: the zip the Kaggle CLI
          saves (nested zips allowed) or its extracted tree. Splits train, test.
  folder  a user's own images/ and masks/ folders in manual_dir. Split train.

Frames are stored at source resolution, PNG-encoded (lossless). Each build records
source_fingerprint() of what it read in info.metadata, so a user of the data can tell
whether the source has changed since (nerveseg_jax.data.tfds_source rebuilds then).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import pathlib
import re
import zipfile
import zlib
from typing import Callable, Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from nerveseg_jax import imageio
from nerveseg_jax import rle
from nerveseg_jax.data.tfds_source import DataNotFoundError, KAGGLE_COMMAND, KAGGLE_ZIP

# Zips that the competition ships inside its zip (or beside train_masks.csv).
_NESTED_ZIP = re.compile(r"^(train|test|train_masks\.csv|sample_submission\.csv)\.zip$")
_TRAIN_IMAGE = re.compile(r"^(\d+)_(\d+)\.tif$")
_TRAIN_MASK = re.compile(r"^(\d+)_(\d+)_mask\.tif$")
_TEST_IMAGE = re.compile(r"^(\d+)\.tif$")
_FOLDER_STEM = re.compile(r"^(\d+)_(\d+)$")
_MAX_DEPTH = 3  # how deep to look for the tree below manual_dir
# Archive limits. A Kaggle download nests one level (train.zip in the download); one
# more allows a re-zipped download. A member read whole must fit in memory (Kaggle's
# largest, train_masks.csv, is 2.2 MB); a nested zip is streamed, but finding its
# directory inflates it once, so it is capped too (Kaggle's train.zip holds 11k LZW
# TIFFs of up to ~0.2 MB, about 1.2 GB).
# zipfile never inflates past a member's declared size (it then fails the CRC), so
# checking the declared size bounds what is actually decompressed.
_MAX_ZIP_NESTING = 3
_MAX_FILE_BYTES = 1 << 30
_MAX_NESTED_ZIP_BYTES = 32 << 30


class BadInputError(ValueError):
  """Input data that cannot be turned into a dataset; the message names the file."""


# A file of the download: (display name, path inside the download, read-bytes function).
# The read function is only valid while the walk is positioned on that file, which is
# what lets nested zips be streamed in storage order instead of extracted.
_File = tuple[str, pathlib.PurePosixPath, Callable[[], bytes]]


def _check_member(zip_name: str, name: str) -> None:
  p = pathlib.PurePosixPath(name.replace("\\", "/"))
  if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in p.parts:
    raise BadInputError(f"{zip_name}: refusing zip member {name!r} (absolute path or "
                        "'..'); this is not a Kaggle download")


def _check_size(name: str, info: zipfile.ZipInfo, cap: int) -> None:
  if info.file_size > cap:
    raise BadInputError(f"{name}: zip member inflates to {info.file_size} bytes, over the "
                        f"{cap}-byte limit (a zip bomb or not a Kaggle download)")


def _member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str
                   ) -> Callable[[], bytes]:
  # Called by the walk's consumer, outside _walk_zip_path's error handling.
  def read() -> bytes:
    try:
      return zf.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
      raise BadInputError(f"{name}: corrupt zip member ({e})") from None
  return read


def _walk_zip(zf: zipfile.ZipFile, display: str, depth: int = 1) -> Iterator[_File]:
  infos = zf.infolist()
  for info in infos:
    _check_member(display, info.filename)
  # Storage order: a nested zip is a forward-only stream, and seeking backwards in it
  # would re-decompress from its start.
  for info in sorted(infos, key=lambda i: i.header_offset):
    rel = pathlib.PurePosixPath(info.filename.replace("\\", "/"))
    if info.is_dir() or rel.name.startswith(".") or "__MACOSX" in rel.parts:
      continue
    name = f"{display}!{info.filename}"
    if rel.name.lower().endswith(".zip"):
      if depth >= _MAX_ZIP_NESTING:
        raise BadInputError(f"{name}: zips nested more than {_MAX_ZIP_NESTING} deep; a "
                            "Kaggle download has one zip inside another")
      _check_size(name, info, _MAX_NESTED_ZIP_BYTES)
      with zf.open(info) as f, zipfile.ZipFile(f) as inner:
        yield from _walk_zip(inner, name, depth + 1)
    else:
      _check_size(name, info, _MAX_FILE_BYTES)
      yield name, rel, _member_reader(zf, info, name)


def _walk_zip_path(path: epath.Path) -> Iterator[_File]:
  try:
    fobj = path.open("rb")
    zf = zipfile.ZipFile(fobj)
  except (zipfile.BadZipFile, OSError) as e:
    raise BadInputError(f"{path}: not a readable zip file ({e})") from None
  with fobj, zf:
    try:
      yield from _walk_zip(zf, str(path))
    except zipfile.BadZipFile as e:
      raise BadInputError(f"{path}: corrupt zip ({e})") from None


def _plain_files(root: epath.Path, depth: int = 0) -> list[epath.Path]:
  """Files below root (hidden ones skipped), sorted, at most _MAX_DEPTH folders deep."""
  out = []
  for p in sorted(root.iterdir(), key=lambda p: p.name):  # by name: cheaper, same order
    if p.name.startswith("."):
      continue
    if p.is_dir():
      if depth < _MAX_DEPTH:
        out += _plain_files(p, depth + 1)
    else:
      out.append(p)
  return out


def _kaggle_inputs(manual_dir: epath.Path) -> tuple[epath.Path | None, list[epath.Path]]:
  """(the download zip, None) or (None, the files of an extracted tree) in manual_dir."""
  files = _plain_files(manual_dir)
  extracted = any(f.name == "train_masks.csv" for f in files)
  other_zips = [f for f in files if f.suffix.lower() == ".zip"
                and not _NESTED_ZIP.match(f.name)]
  if not extracted and other_zips:
    # The download itself: prefer the Kaggle CLI's file name, else the only zip.
    named = [f for f in other_zips if f.name == KAGGLE_ZIP]
    if not named and len(other_zips) > 1:
      raise BadInputError(
          f"{manual_dir} holds several zips ({', '.join(f.name for f in other_zips)}) "
          f"and no {KAGGLE_ZIP}; point data.manual_dir at the Kaggle zip itself")
    return (named or other_zips)[0], []
  return None, [f for f in files
                if _NESTED_ZIP.match(f.name) or f.suffix.lower() != ".zip"]


def _walk_kaggle(manual_dir: epath.Path) -> Iterator[_File]:
  """Files of the Kaggle download in manual_dir, through any nested zips."""
  download, files = _kaggle_inputs(manual_dir)
  if download is not None:
    yield from _walk_zip_path(download)
    return
  for f in files:
    rel = pathlib.PurePosixPath(f.relative_to(manual_dir).as_posix())
    if _NESTED_ZIP.match(f.name):
      yield from _walk_zip_path(f)
    else:
      yield str(f), rel, (lambda f=f: f.read_bytes())


# ------------------------------------------------------------------ source fingerprint

_DIGESTS: dict[tuple, str] = {}  # (real path, size, mtime_ns) -> sha256, per process


def _stat(path) -> tuple[int, int]:
  """(size, mtime_ns), following links: a staged link to a zip stands for the zip.
  pathlib, not os: TFDS's builder test harness forbids os.* in builder modules."""
  if "://" in str(path):  # object stores: epath knows whole seconds only
    st = epath.Path(path).stat()
    return st.length, int(st.mtime) * 10**9
  st = pathlib.Path(path).stat()
  return st.st_size, st.st_mtime_ns


def file_sha256(path) -> str:
  """SHA-256 of a file's bytes, remembered for this process while it is unchanged."""
  real = str(path) if "://" in str(path) else str(pathlib.Path(path).resolve())
  key = (real, *_stat(path))
  if key not in _DIGESTS:
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    _DIGESTS[key] = h.hexdigest()
  return _DIGESTS[key]


def _source_files(config: str, manual_dir) -> list[tuple[str, pathlib.PurePath]]:
  """(path below manual_dir, path) of each file a build of manual_dir reads (zips
  whole), in a fixed order."""
  start = len(str(manual_dir).rstrip("/")) + 1

  def rel(f) -> str:  # f lies below manual_dir; slicing is cheaper than relative_to
    return str(f)[start:]
  if config == "folder":
    return [(f"{d}/{f.name}", f) for d in ("images", "masks") if (manual_dir / d).is_dir()
            for f in sorted((manual_dir / d).iterdir())
            if not f.name.startswith(".") and f.is_file()]
  download, files = _kaggle_inputs(manual_dir)
  if download is not None:
    return [("<download>", download)]  # its own name does not matter to the build
  return [(r, f) for f in files
          if _NESTED_ZIP.match(f.name)
          or _classify(pathlib.PurePosixPath(r := rel(f))) is not None]


def source_fingerprint(config: str, manual_dir, zip_sha256: Callable[[epath.Path], str]
                       = file_sha256) -> str:
  """A digest of what a build of manual_dir reads: each file's path below manual_dir,
  size, and modification time (stat only: ~0.5 s of CPU for the 17k files of the
  extracted Kaggle tree); a zip by its size and content hash instead, so a download
  fetched again, or fetched on another host, is the same source. Any file added,
  removed or edited changes it."""
  # pathlib where it can: epath's path objects cost ~10x more per file to make.
  remote = "://" in str(manual_dir)
  manual_dir = epath.Path(manual_dir) if remote else pathlib.Path(manual_dir)
  rows = []
  for rel, f in _source_files(config, manual_dir):
    size, mtime_ns = _stat(f)
    if config == "kaggle" and f.suffix.lower() == ".zip":
      rows.append([rel, size, "sha256:" + zip_sha256(f)])
    else:
      rows.append([rel, size, mtime_ns])
  return hashlib.sha256(json.dumps([config, rows]).encode()).hexdigest()


def recorded_fingerprint(builder: tfds.core.DatasetBuilder) -> str:
  """The source fingerprint a prepared build recorded ('' if built without one)."""
  try:
    return str(builder.info.metadata["source_fingerprint"])
  except (KeyError, TypeError):
    return ""


def _classify(rel: pathlib.PurePosixPath) -> tuple[str, str] | None:
  """(kind, id) for a file of the Kaggle layout, None for files we do not use."""
  parent = rel.parts[-2] if len(rel.parts) > 1 else ""
  if rel.name == "train_masks.csv":
    return "csv", ""
  if parent == "train":
    if m := _TRAIN_MASK.match(rel.name):
      return "mask", f"{int(m[1])}_{int(m[2])}"
    if m := _TRAIN_IMAGE.match(rel.name):
      return "image", f"{int(m[1])}_{int(m[2])}"
  if parent == "test" and (m := _TEST_IMAGE.match(rel.name)):
    return "test", str(int(m[1]))
  if parent in ("train", "test") and rel.suffix.lower() == ".tif":
    raise BadInputError(f"{rel}: unexpected file name in {parent}/; the Kaggle layout is "
                        "train/{subject}_{frame}.tif, train/{subject}_{frame}_mask.tif, "
                        "test/{n}.tif")
  return None


def _decode(data: bytes, name: str) -> np.ndarray:
  """Any PIL-readable image as uint8 (H, W) grayscale (nerveseg_jax.imageio's rules:
  RGB through PIL's 'L', 16-bit scaled by its type's range); errors name the file."""
  try:
    return imageio.decode_gray(data, name)
  except imageio.ImageReadError as e:
    raise BadInputError(str(e)) from None  # "<file>: corrupt or unreadable image (...)"


def _example(key_id: str, image: np.ndarray, mask: np.ndarray, subject: int,
             labeled: bool) -> dict:
  return {
      "image": image[..., None],
      "mask": mask.astype(np.uint8)[..., None],
      "id": key_id,
      "subject": subject,
      "has_nerve": bool(mask.any()),
      "labeled": labeled,
  }


class Builder(tfds.core.GeneratorBasedBuilder):
  """Ultrasound nerve segmentation: Kaggle download or a user's folder."""

  # TFDS locates README.md, CITATIONS.bib, checksums.tsv and dummy_data/ from the
  # module name, which misses them when the package directory is remapped (editable
  # install: nerveseg_jax.datasets lives in datasets/), and its code_path needs
  # importlib_resources, which recent etils no longer installs. The file's own
  # folder is right for every way of installing.
  pkg_dir_path = epath.Path(__file__).parent

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=invalid-overridden-method
    return epath.Path(__file__)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: kaggle and folder configs."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name="kaggle",
          description="The Kaggle competition download (zip or extracted tree)."),
      tfds.core.BuilderConfig(
          name="folder",
          description="images/{subject}_{frame}.* and masks/{subject}_{frame}_mask.*, "
                      "any PIL format, gray or RGB, any size."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "kaggle"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  kaggle config: download the competition data (accept its rules on kaggle.com first):
    {KAGGLE_COMMAND}
  and put {KAGGLE_ZIP} (or its extracted train/, test/, train_masks.csv) in manual_dir.
  In nerveseg_jax configs set data.manual_dir to the zip or the folder.
  folder config: manual_dir holds images/ and masks/ (set data.manual_dir).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "id": tfds.features.Text(),
            "subject": tfds.features.Scalar(np.int32),
            "has_nerve": tfds.features.Scalar(np.bool_),
            "labeled": tfds.features.Scalar(np.bool_),
        }),
        homepage="https://www.kaggle.com/c/ultrasound-nerve-segmentation",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = epath.Path(self._manual_dir(dl_manager))
    config = self.builder_config.name
    # Taken before anything is read: a file edited during the build then leaves a
    # fingerprint that no longer matches, and the next use rebuilds.
    self.info.metadata["source_fingerprint"] = source_fingerprint(config, manual_dir)
    # Everything is listed and cross-checked here, before a single example is written.
    if config == "folder":
      return {"train": self._generate_examples("folder", manual_dir,
                                               _list_folder(manual_dir))}
    listing = _list_kaggle(manual_dir)
    return {"train": self._generate_examples("train", manual_dir, listing),
            "test": self._generate_examples("test", manual_dir, listing)}

  def _generate_examples(self, kind: str, manual_dir: epath.Path, listing):
    if kind == "folder":
      return self._generate_folder(listing)
    if kind == "train":
      return self._generate_train(manual_dir, listing)
    return self._generate_test(manual_dir, listing)

  def _manual_dir(self, dl_manager) -> epath.Path:
    try:
      return dl_manager.manual_dir
    except AssertionError as e:  # TFDS's "does not exist or is empty"
      raise DataNotFoundError(_missing_message(self.builder_config.name, str(e))) from None

  def _generate_train(self, manual_dir: epath.Path, listing: "_KaggleListing"):
    # One pass in storage order; an image waits here until its mask turns up.
    pending: dict[str, dict[str, tuple[str, bytes]]] = collections.defaultdict(dict)
    for name, rel, read in _walk_kaggle(manual_dir):
      kind = _classify(rel)
      if kind is None or kind[0] not in ("image", "mask"):
        continue
      what, key = kind
      pending[key][what] = (name, read())
      if len(pending[key]) == 2:
        yield key, self._train_example(key, pending.pop(key), listing)

  def _train_example(self, key: str, pair: dict, listing: "_KaggleListing") -> dict:
    image_name, image_bytes = pair["image"]
    mask_name, mask_bytes = pair["mask"]
    image = _decode(image_bytes, image_name)
    mask = _decode(mask_bytes, mask_name)
    if mask.shape != image.shape:
      raise BadInputError(f"{mask_name}: mask is {mask.shape[1]}x{mask.shape[0]} but its "
                          f"image is {image.shape[1]}x{image.shape[0]}")
    bad = (mask != 0) & (mask != 255)
    if bad.any():
      raise BadInputError(f"{mask_name}: mask has values other than 0 and 255 "
                          f"(e.g. {int(mask[bad][0])}); Kaggle masks are binary")
    row = listing.csv_rows.get(key)
    if row is None:
      raise BadInputError(f"{listing.csv_name}: no row for {key} (its mask is {mask_name})")
    try:
      truth = rle.decode(row, height=mask.shape[0], width=mask.shape[1])
    except rle.RLEError as e:
      raise BadInputError(f"{listing.csv_name}: row {key}: {e}") from None
    if not np.array_equal(truth, mask > 0):
      raise BadInputError(
          f"{mask_name} disagrees with {listing.csv_name} row {key}: "
          f"{int((mask > 0).sum())} nerve pixels in the file, {int(truth.sum())} in the CSV, "
          f"{int((truth != (mask > 0)).sum())} differ")
    subject = int(key.split("_")[0])
    return _example(key, image, (mask > 0).astype(np.uint8), subject, True)

  def _generate_test(self, manual_dir: epath.Path, listing: "_KaggleListing"):
    for name, rel, read in _walk_kaggle(manual_dir):
      kind = _classify(rel)
      if kind is None or kind[0] != "test":
        continue
      image = _decode(read(), name)
      yield f"test_{kind[1]}", _example(kind[1], image, np.zeros_like(image), -1, False)

  def _generate_folder(self, pairs: list[tuple[str, epath.Path, epath.Path]]):
    for stem, image_path, mask_path in pairs:
      image = _decode(image_path.read_bytes(), str(image_path))
      mask = _decode(mask_path.read_bytes(), str(mask_path))
      if mask.shape != image.shape:
        raise BadInputError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                            f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
      m = _FOLDER_STEM.match(stem)
      # Half range: JPEG masks are lossy, so 0/255 arrive as small/large values
      # (masks saved as 0/1 are taken as they are; imageio.binarize_mask).
      yield stem, _example(stem, image, imageio.binarize_mask(mask),
                           int(m[1]) if m else -1, True)


def _missing_message(config: str, detail: str = "") -> str:
  if config == "folder":
    return (f"ultrasound_nerve/folder: no data found. Set data.manual_dir to a folder "
            f"holding images/ and masks/. {detail} With the TFDS CLI pass "
            "--config=kaggle or --config=folder: without --config, `tfds build` builds "
            "every config on the same --manual_dir.").strip()
  return (f"ultrasound_nerve/kaggle: the Kaggle download was not found. Run\n"
          f"  {KAGGLE_COMMAND}\n"
          f"and set data.manual_dir to {KAGGLE_ZIP} or to the folder holding it (or its "
          f"extracted train/, test/, train_masks.csv). {detail}").strip()


class _KaggleListing:
  """What a Kaggle download holds, checked before anything is written."""

  def __init__(self, csv_name: str, csv_rows: dict[str, str], train_ids: set[str]):
    self.csv_name, self.csv_rows, self.train_ids = csv_name, csv_rows, train_ids


def _read_csv(data: bytes, name: str) -> dict[str, str]:
  rows = {}
  try:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    if not {"subject", "img", "pixels"} <= set(reader.fieldnames or ()):
      raise BadInputError(f"{name}: expected columns subject,img,pixels, got "
                          f"{reader.fieldnames}")
    for i, r in enumerate(reader, start=2):
      try:
        key = f"{int(r['subject'])}_{int(r['img'])}"
      except (TypeError, ValueError):
        raise BadInputError(f"{name}:{i}: bad subject/img {r['subject']!r},{r['img']!r}") \
            from None
      rows[key] = r["pixels"] or ""
  except UnicodeDecodeError as e:
    raise BadInputError(f"{name}: not a text CSV ({e})") from None
  return rows


def _list_kaggle(manual_dir: epath.Path) -> _KaggleListing:
  where: dict[tuple[str, str], str] = {}
  csv_name, csv_rows = None, None
  for name, rel, read in _walk_kaggle(manual_dir):
    kind = _classify(rel)
    if kind is None:
      continue
    if kind in where:
      raise BadInputError(f"{name}: duplicate of {where[kind]}")
    where[kind] = name
    if kind[0] == "csv":
      csv_name, csv_rows = name, _read_csv(read(), name)
  images = {k for (kind, k) in where if kind == "image"}
  masks = {k for (kind, k) in where if kind == "mask"}
  tests = {k for (kind, k) in where if kind == "test"}
  if not images and not masks and not tests:
    raise DataNotFoundError(_missing_message(
        "kaggle", f"({manual_dir} has no train/*.tif or test/*.tif)"))
  if orphans := sorted(masks - images):
    raise BadInputError(f"{where[('mask', orphans[0])]}: mask without its image "
                        f"train/{orphans[0]}.tif ({len(orphans)} such masks)")
  if orphans := sorted(images - masks):
    raise BadInputError(f"{where[('image', orphans[0])]}: image without its mask "
                        f"train/{orphans[0]}_mask.tif ({len(orphans)} such images)")
  if images and csv_rows is None:
    raise BadInputError(f"{manual_dir}: train_masks.csv is missing from the download")
  if csv_rows is not None:
    if unmatched := sorted(set(csv_rows) - images):
      raise BadInputError(f"{csv_name}: lists {unmatched[0]} but train/{unmatched[0]}.tif "
                          f"is missing ({len(unmatched)} such rows)")
  return _KaggleListing(csv_name or "", csv_rows or {}, images)


def _list_folder(manual_dir: epath.Path):
  dirs = {d: manual_dir / d for d in ("images", "masks")}
  for d, p in dirs.items():
    if not p.is_dir():
      raise DataNotFoundError(_missing_message("folder", f"({p} does not exist)"))
  found: dict[str, dict[str, epath.Path]] = {"images": {}, "masks": {}}
  for d, p in dirs.items():
    for f in sorted(p.iterdir()):
      if f.name.startswith(".") or not f.is_file():
        continue
      stem = f.stem
      if d == "masks":
        if not stem.endswith("_mask"):
          raise BadInputError(f"{f}: mask file names must be {{stem}}_mask.<ext>")
        stem = stem[:-len("_mask")]
      if stem in found[d]:
        raise BadInputError(f"{f}: same stem as {found[d][stem]}")
      found[d][stem] = f
  images, masks = found["images"], found["masks"]
  if not images:
    raise DataNotFoundError(_missing_message("folder", f"({dirs['images']} is empty)"))
  if orphans := sorted(set(masks) - set(images)):
    raise BadInputError(f"{masks[orphans[0]]}: mask without its image "
                        f"images/{orphans[0]}.* ({len(orphans)} such masks)")
  if orphans := sorted(set(images) - set(masks)):
    raise BadInputError(f"{images[orphans[0]]}: image without its mask "
                        f"masks/{orphans[0]}_mask.* ({len(orphans)} such images)")
  return [(s, images[s], masks[s]) for s in sorted(images)]
