"""Labelled frames at their source resolution, as Kaggle scores them.

A split of the run's data set (folds and filtering exactly as in training, pixels from
the TFDS builder, which stores the source size), the synthetic test split with its
hidden truth, or a labelled folder (images/ + masks/, or Kaggle's flat layout).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from nerveseg_jax import imageio, rle

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Labelled:
  name: str
  image: np.ndarray   # uint8 (H, W)
  truth: np.ndarray   # uint8 (H, W) 0/1


def split_ids(data_cfg, split: str) -> set[str]:
  """Frame ids of a pipeline split: folds and filtering exactly as in training."""
  from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return {_text(i) for i in pipeline.load_arrays(data_cfg, split).id}


def dataset_frames(data_cfg, split: str, ids: set[str] | None = None
                    ) -> Iterator[Labelled]:
  """Source-resolution frames and masks of a pipeline split, from the TFDS builder.

  Split membership comes from pipeline.load_arrays (its arrays are resized, so only
  the ids are used); pixels come from the builder, which stores the source size.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  if split == "test":
    yield from test_frames(data_cfg)
    return
  ids = split_ids(data_cfg, split) if ids is None else ids
  builder = tfds_source.build(data_cfg)
  for ex in tfds.as_numpy(builder.as_dataset(split="train")):
    name = _text(ex["id"])
    if name in ids:
      yield Labelled(name, ex["image"][..., 0], (ex["mask"][..., 0] != 0).astype(np.uint8))


def test_frames(data_cfg) -> Iterator[Labelled]:
  """Kaggle test frames scored against test_truth.csv (only the synthetic set has one)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  builder = tfds_source.build(data_cfg)  # first: it generates a synthetic tree
  truth_csv = find_test_truth(data_cfg)
  truths: dict[str, str] = {}
  with open(truth_csv, newline="") as f:
    for row in csv.DictReader(f):
      truths[row["img"]] = row["pixels"]
  for ex in tfds.as_numpy(builder.as_dataset(split="test")):
    name = _text(ex["id"])
    if name not in truths:
      raise ValueError(f"{truth_csv}: no row for test frame {name!r}")
    h, w = ex["image"].shape[:2]
    yield Labelled(name, ex["image"][..., 0], rle.decode(truths[name], h, w))


def find_test_truth(data_cfg) -> pathlib.Path:
  """test_truth.csv of the raw tree the builder was made from (synthetic sets have one)."""
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  raw = tfds_source.raw_tree(data_cfg)
  if raw is None or not (raw / "test_truth.csv").exists():
    raise ValueError("--split test: the Kaggle test split is unlabelled; only a tree with "
                     "test_truth.csv (the synthetic set) can be scored; none in "
                     f"{raw if raw is not None else 'data.manual_dir (empty)'}. "
                     "For unlabelled frames use nerveseg-predict.")
  return raw / "test_truth.csv"


def folder_frames(folder: str | pathlib.Path,
                   skipped: list[dict[str, str]] | None = None) -> Iterator[Labelled]:
  """Frames and masks of a labelled folder (images/ + masks/, or flat Kaggle layout).

  A frame or mask that cannot be read is reported by name, appended to `skipped`
  (when given) and left out; the other frames are still scored. Without `skipped`
  the first such file raises.
  """
  folder = pathlib.Path(folder).expanduser()
  if (folder / "images").is_dir():
    image_dir, mask_dir = folder / "images", folder / "masks"
  else:
    image_dir = mask_dir = folder
  if not image_dir.is_dir():
    raise FileNotFoundError(f"--folder {folder}: not a folder")
  paths, _ = imageio.list_inputs(image_dir)
  if not paths:
    raise ValueError(f"--folder {folder}: no tif/png/jpg frames found")
  masks = {}
  if mask_dir.is_dir():
    masks = {p.stem[:-len("_mask")]: p for p in mask_dir.iterdir()
             if imageio.is_image_file(p) and imageio.is_mask_name(p)}
  missing = [p.name for p in paths if p.stem not in masks]
  if missing:
    raise ValueError(f"--folder {folder}: {len(missing)} frames have no NAME_mask file in "
                     f"{mask_dir}, e.g. {missing[:3]}")
  for p in paths:
    try:
      image, truth = imageio.read_gray(p), imageio.read_mask(masks[p.stem])
      if image.shape != truth.shape:
        raise imageio.ImageReadError(
            f"{masks[p.stem]}: mask is {truth.shape[1]}x{truth.shape[0]}, frame {p} is "
            f"{image.shape[1]}x{image.shape[0]}")
    except imageio.ImageReadError as e:
      if skipped is None:
        raise
      skipped.append(dict(file=str(p), error=str(e)))
      log.warning("skipped %s", e)
      continue
    yield Labelled(p.stem, image, truth)


def _text(x: Any) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def chunks(frames: Iterable[Labelled], size: int) -> Iterator[list[Labelled]]:
  chunk: list[Labelled] = []
  for f in frames:
    chunk.append(f)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk
