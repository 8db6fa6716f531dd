"""TFDS examples -> this process's frames of a split, resized once and cached.

  load_arrays(data_cfg, split)   train | val | all | test at data.image_size, after
                                 data.fold and data.duplicates; cached as .npy beside
                                 the TFDS data (nerveseg_cache/), so later runs skip
                                 decoding and resizing
  cached_split(builder, ...)     the cache itself, per (split, size, process, dataset
                                 fingerprint: a rebuilt source never meets an old cache)

For data.source=synthetic, a run whose build and cache already exist reads the cache
without importing TensorFlow or TFDS (tfds_source.ready_build vouches for the build,
and the cache key is the same), so training on it needs neither installed.

Why resize once: the set is small at network size (the Kaggle train set is ~130 MB at
128x176), so it is held in host memory and a training batch is a gather of rows
(nerveseg_jax.data.pipeline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from nerveseg_jax.data import duplicates, folds, preprocess

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "all", "test")
_CACHE_VERSION = 1        # bump when the cached arrays' meaning changes
_RESIZE_CHUNK = 64        # frames per jitted resize call (fixed: one compilation)
_CACHE_DIR = "nerveseg_cache"  # in the build's TFDS data folder


@dataclasses.dataclass
class Arrays:
  """Host numpy arrays of one split on this process, at data.image_size."""
  image: np.ndarray      # uint8 (N, H, W, 1)
  mask: np.ndarray       # uint8 (N, H, W, 1) in {0, 1}
  has_nerve: np.ndarray  # bool (N,)
  labeled: np.ndarray    # bool (N,)
  id: np.ndarray         # str (N,)
  subject: np.ndarray    # int32 (N,), -1 unknown

  def __len__(self) -> int:
    return len(self.image)

  def take(self, rows: np.ndarray) -> "Arrays":
    return Arrays(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


# ------------------------------------------------------------------------ multi-host


def _process() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def _allgather_rows(x: np.ndarray) -> list[np.ndarray]:
  """Every process's `x` (rows may differ in number), in process order."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return [x]
  # Collectives want one shape everywhere: pad to the longest, then cut back.
  counts = np.asarray(multihost_utils.process_allgather(np.array([len(x)], np.int32)))
  counts = counts.reshape(-1)
  dtype = np.uint8 if x.dtype == bool else x.dtype
  padded = np.zeros((int(counts.max()), *x.shape[1:]), dtype)
  padded[:len(x)] = x
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [gathered[p, :counts[p]].astype(x.dtype) for p in range(len(counts))]


def max_over_processes(n: int) -> int:
  """The largest n of all processes (batch counts that every process must agree on)."""
  if jax.process_count() == 1:
    return n
  return int(np.asarray(multihost_utils.process_allgather(np.array([n], np.int32))).max())


# ----------------------------------------------------------------- load and cache


def _check_data_cfg(data_cfg, split: str) -> tuple[tuple[int, int], str]:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
  size = preprocess.check_size(data_cfg.image_size, "data.image_size")
  mode = duplicates.check_mode(data_cfg.duplicates)
  if split in ("train", "val"):
    _, fold = folds.check(data_cfg.num_folds, data_cfg.fold)
    if split == "val" and fold == -1:
      raise ValueError("data.fold=-1 trains on every subject, so there is no 'val' split; "
                       "set data.fold to 0..data.num_folds-1 to hold one out")
  return size, mode


def _dataset_fingerprint(builder) -> str:
  """Changes when the TFDS data are rebuilt: the source fingerprint the build recorded
  (any frame added, removed or edited, even one that leaves every shard's size alone)
  and dataset_info.json (split sizes, version)."""
  from nerveseg_jax.datasets.ultrasound_nerve import ultrasound_nerve_dataset_builder as und  # pylint: disable=g-import-not-at-top
  info = pathlib.Path(builder.data_dir) / "dataset_info.json"
  return _fingerprint_of(und.recorded_fingerprint(builder),
                         info.read_bytes() if info.exists() else str(builder.info.splits).encode())


def _fingerprint_of(source_fingerprint: str, dataset_info: bytes) -> str:
  h = hashlib.blake2b(digest_size=8)
  h.update(source_fingerprint.encode())
  h.update(dataset_info)
  return h.hexdigest()


def _cache_key(tfds_split: str, size: tuple[int, int], dataset_fingerprint: str) -> str:
  index, count = _process()
  return (f"{tfds_split}_{size[0]}x{size[1]}_p{index}of{count}"
          f"_{dataset_fingerprint}_v{_CACHE_VERSION}")


def _check_processes_agree(builder, data_cfg) -> None:
  """Every process must train on the same data: the source fingerprints their builds
  recorded must match (a host with another copy of the download, or one edited since,
  would otherwise add its frames to the same batches silently)."""
  if jax.process_count() == 1:
    return
  from nerveseg_jax.datasets.ultrasound_nerve import ultrasound_nerve_dataset_builder as und  # pylint: disable=g-import-not-at-top
  _check_fingerprints_agree(und.recorded_fingerprint(builder), data_cfg)


def _check_fingerprints_agree(source_fingerprint: str, data_cfg) -> None:
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(source_fingerprint.encode()).digest()
  every = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint8)))
  every = every.reshape(-1, len(digest))
  if odd := [p for p in range(len(every)) if (every[p] != every[0]).any()]:
    raise ValueError(
        f"data.manual_dir={data_cfg.manual_dir!r}: process(es) {odd} read other data "
        "than process 0 (their builds' source fingerprints differ); every host needs "
        "the same files (names, sizes, modification times) or one prepared data.data_dir "
        "shared by all")


def _read_resized(builder, tfds_split, size: tuple[int, int]) -> Arrays:
  """Decodes a TFDS (sub)split and resizes frames in fixed-size jitted chunks."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  resize_image = jax.jit(lambda x: jnp.clip(jnp.round(preprocess.resize(x, size)), 0, 255)
                         .astype(jnp.uint8))
  resize_mask = jax.jit(lambda x: preprocess.resize(x, size, is_mask=True).astype(jnp.uint8))
  images, masks, meta = [], [], {k: [] for k in ("has_nerve", "labeled", "id", "subject")}
  pending: list[dict] = []

  def flush():
    # Chunks of one source shape (the folder config allows any size), padded to a
    # fixed count so that each source shape compiles once.
    by_shape: dict[tuple, list[dict]] = {}
    for ex in pending:
      by_shape.setdefault(ex["image"].shape, []).append(ex)
    for group in by_shape.values():
      n = len(group)
      img = np.zeros((_RESIZE_CHUNK, *group[0]["image"].shape), np.uint8)
      msk = np.zeros_like(img)
      for i, ex in enumerate(group):
        img[i], msk[i] = ex["image"], ex["mask"]
      images.append(np.asarray(resize_image(img))[:n])
      masks.append(np.asarray(resize_mask(msk))[:n])
      for ex in group:
        for k in meta:
          meta[k].append(ex[k])
    pending.clear()

  ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
  for ex in tfds.as_numpy(ds):
    pending.append(ex)
    if len(pending) == _RESIZE_CHUNK:
      flush()
  flush()
  h, w = size
  ids = [i.decode() if isinstance(i, bytes) else str(i) for i in meta["id"]]
  return Arrays(
      image=np.concatenate(images) if images else np.zeros((0, h, w, 1), np.uint8),
      mask=np.concatenate(masks) if masks else np.zeros((0, h, w, 1), np.uint8),
      has_nerve=np.array(meta["has_nerve"], bool),
      labeled=np.array(meta["labeled"], bool),
      id=np.array(ids, dtype=str),
      subject=np.array(meta["subject"], np.int32))


def _cache_root(builder) -> pathlib.Path:
  return pathlib.Path(builder.data_dir) / _CACHE_DIR


def _save_cache(path: pathlib.Path, arrays: Arrays) -> None:
  """Writes into a temp folder and renames it: a cache is complete or absent."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    for f in dataclasses.fields(arrays):
      np.save(tmp / f"{f.name}.npy", getattr(arrays, f.name), allow_pickle=False)
    try:
      os.rename(tmp, path)
    except OSError:
      if not path.exists():  # not a concurrent writer that got there first
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _load_cache(path: pathlib.Path) -> Arrays:
  return Arrays(**{f.name: np.load(path / f"{f.name}.npy", allow_pickle=False)
                   for f in dataclasses.fields(Arrays)})


def cached_split(builder, tfds_split: str, size: tuple[int, int]) -> Arrays:
  """This process's part of a TFDS split, resized to size; cached after the first call."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  index, count = _process()
  path = _cache_root(builder) / _cache_key(tfds_split, size, _dataset_fingerprint(builder))
  if path.is_dir():
    return _load_cache(path)
  # Each process reads only its even share of the records.
  part = tfds.even_splits(tfds_split, n=count)[index] if count > 1 else tfds_split
  t0 = time.perf_counter()
  arrays = _read_resized(builder, part, size)
  log.info("resized %d frames of %s to %s in %.1fs", len(arrays), tfds_split, size,
               time.perf_counter() - t0)
  try:
    _save_cache(path, arrays)
  except OSError as e:  # e.g. a read-only shared data_dir: run on, uncached
    log.warning("could not write the resized cache %s (%s); continuing without", path, e)
  return arrays


def _ready_cache(data_cfg, tfds_split: str, size: tuple[int, int]
                 ) -> tuple[pathlib.Path, str] | None:
  """(cache folder, recorded source fingerprint) when this process's resized cache of
  a vouched-for build is on disk, found without TFDS; None to go through TFDS.

  The key is cached_split's own, computed from the same recorded fingerprint and
  dataset_info.json, so it is exactly the cache that path would read. The processes
  agree first: all take this path or none does (the TFDS path has collectives)."""
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  if data_cfg.source != "synthetic":  # the same on every process: no need to agree
    return None
  found = None
  ready = tfds_source.ready_build(data_cfg)
  if ready is not None:
    try:
      info = (ready.data_dir / "dataset_info.json").read_bytes()
      path = ready.data_dir / _CACHE_DIR / _cache_key(
          tfds_split, size, _fingerprint_of(ready.source_fingerprint, info))
      if all((path / f"{f.name}.npy").is_file() for f in dataclasses.fields(Arrays)):
        found = (path, ready.source_fingerprint)
    except OSError:
      pass
  if jax.process_count() > 1:
    every = multihost_utils.process_allgather(np.array([found is not None], np.int32))
    if not np.asarray(every).all():
      return None
  return found


def _contradictory_rows(arrays: Arrays, cache_dir: pathlib.Path
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(local rows of empty members, the masks to propagate onto them).

  Pairs live within a subject, but a subject's frames are spread over processes, so
  with several processes the signatures are gathered and every process finds the same
  global pairs, then takes the rows it owns.
  """
  if jax.process_count() == 1:
    pairs = duplicates.find_contradictory_pairs(arrays.image, arrays.mask, arrays.subject,
                                                cache_dir=cache_dir)
    return pairs[:, 0], arrays.mask[pairs[:, 1]]
  sig = _allgather_rows(duplicates.signatures(arrays.image))
  has = _allgather_rows(arrays.has_nerve)
  subj = _allgather_rows(arrays.subject)
  offsets = np.cumsum([0] + [len(s) for s in sig])
  pairs = duplicates.pairs_from_signatures(np.concatenate(sig), np.concatenate(has),
                                           np.concatenate(subj))
  me = jax.process_index()
  lo, hi = offsets[me], offsets[me + 1]
  # Each non-empty member's mask comes from its owner; the others contribute zeros.
  donor = np.zeros((len(pairs), *arrays.mask.shape[1:]), np.uint8)
  mine = (pairs[:, 1] >= lo) & (pairs[:, 1] < hi)
  donor[mine] = arrays.mask[pairs[mine, 1] - lo]
  if len(pairs):  # same (K, H, W, 1) on every process: a plain gather, then the owner's
    donor = np.asarray(multihost_utils.process_allgather(donor)).max(axis=0)
  own = (pairs[:, 0] >= lo) & (pairs[:, 0] < hi)
  return pairs[own, 0] - lo, donor[own]


def apply_duplicates(arrays: Arrays, mode: str, cache_dir: pathlib.Path | None) -> Arrays:
  """data.duplicates on `arrays`: keep, drop the empty twins, or propagate masks to them."""
  if mode == "keep" or not len(arrays):
    return arrays
  rows, masks = _contradictory_rows(arrays, cache_dir)
  if not len(rows):
    return arrays
  if mode == "drop":
    keep = np.ones(len(arrays), bool)
    keep[rows] = False
    return arrays.take(np.flatnonzero(keep))
  mask, has = arrays.mask.copy(), arrays.has_nerve.copy()
  mask[rows], has[rows] = masks, True
  return dataclasses.replace(arrays, mask=mask, has_nerve=has)


def load_arrays(data_cfg: ml_collections.ConfigDict, split: str) -> Arrays:
  """This process's frames of `split` (train | val | all | test) at data.image_size.

  train / val: the training folds / the held-out fold (data.num_folds, data.fold),
  after data.duplicates; all: every labelled frame, after data.duplicates;
  test: the Kaggle test split, unlabelled.
  """
  size, mode = _check_data_cfg(data_cfg, split)
  tfds_split = "test" if split == "test" else "train"
  if ready := _ready_cache(data_cfg, tfds_split, size):
    path, source_fingerprint = ready
    _check_fingerprints_agree(source_fingerprint, data_cfg)
    arrays, cache_root = _load_cache(path), path.parent
  else:
    from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    builder = tfds_source.build(data_cfg)
    _check_processes_agree(builder, data_cfg)
    if tfds_split not in builder.info.splits:
      raise ValueError(f"data.source={data_cfg.source!r} has no {tfds_split!r} split "
                       f"(it has {', '.join(builder.info.splits)})")
    arrays, cache_root = cached_split(builder, tfds_split, size), _cache_root(builder)
  if split == "test":
    return arrays
  arrays = arrays.take(np.flatnonzero(arrays.labeled))
  arrays = apply_duplicates(arrays, mode, cache_root)
  if split == "all":
    return arrays
  every = np.unique(np.concatenate(_allgather_rows(np.unique(arrays.subject))))
  rows = folds.select(arrays.subject, data_cfg.num_folds, data_cfg.fold, split,
                      all_subjects=every)
  return arrays.take(np.flatnonzero(rows))
