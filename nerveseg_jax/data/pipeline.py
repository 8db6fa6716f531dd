"""TFDS examples -> resized host arrays (cached) -> global, sharded batches.

  load_arrays(data_cfg, split)   this process's frames of a split, resized once to
                                 data.image_size and cached as .npy beside the TFDS data
  TrainIterator(...)             infinite, deterministic in (seed, step), prefetched
  eval_batches(...)              padded batches with `valid`, every frame exactly once

Design (issue 7): the set is small once resized (the Kaggle train set is ~130 MB at
128x176), so it is decoded and resized once, cached, and held in memory; a training
batch is a gather of rows. Augmentation runs on device inside the jitted train step
(nerveseg_jax.data.augment). Optionally the whole set also lives on every device and
the gather runs there (device_resident); see docs/data_pipeline.md for when.

Measurement CLI: python -m nerveseg_jax.data.pipeline --config configs/unet.py:synthetic
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import os
import pathlib
import queue
import shutil
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nerveseg_jax.data import duplicates, folds, preprocess

SPLITS = ("train", "val", "all", "test")
BATCH_AXES = ("data", "fsdp")
_CACHE_VERSION = 1        # bump when the cached arrays' meaning changes
_RESIZE_CHUNK = 64        # frames per jitted resize call (fixed: one compilation)
# device_resident=None holds the set on every device when one copy is at most this
# share of a device's memory (accelerators only; see docs/data_pipeline.md for CPU).
_RESIDENT_SHARE = 0.2


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


def _max_over_processes(n: int) -> int:
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
  """Changes when the TFDS data are rebuilt (new shard sizes, checksums or version)."""
  info = pathlib.Path(builder.data_dir) / "dataset_info.json"
  h = hashlib.blake2b(digest_size=8)
  h.update(info.read_bytes() if info.exists() else str(builder.info.splits).encode())
  return h.hexdigest()


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
  return pathlib.Path(builder.data_dir) / "nerveseg_cache"


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
  key = (f"{tfds_split}_{size[0]}x{size[1]}_p{index}of{count}"
         f"_{_dataset_fingerprint(builder)}_v{_CACHE_VERSION}")
  path = _cache_root(builder) / key
  if path.is_dir():
    return _load_cache(path)
  # Each process reads only its even share of the records.
  part = tfds.even_splits(tfds_split, n=count)[index] if count > 1 else tfds_split
  t0 = time.perf_counter()
  arrays = _read_resized(builder, part, size)
  logging.info("resized %d frames of %s to %s in %.1fs", len(arrays), tfds_split, size,
               time.perf_counter() - t0)
  try:
    _save_cache(path, arrays)
  except OSError as e:  # e.g. a read-only shared data_dir: run on, uncached
    logging.warning("could not write the resized cache %s (%s); continuing without", path, e)
  return arrays


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


def _apply_duplicates(arrays: Arrays, mode: str, cache_dir: pathlib.Path) -> Arrays:
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
  from nerveseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  builder = tfds_source.build(data_cfg)
  tfds_split = "test" if split == "test" else "train"
  if tfds_split not in builder.info.splits:
    raise ValueError(f"data.source={data_cfg.source!r} has no {tfds_split!r} split "
                     f"(it has {', '.join(builder.info.splits)})")
  arrays = cached_split(builder, tfds_split, size)
  if split == "test":
    return arrays
  arrays = arrays.take(np.flatnonzero(arrays.labeled))
  arrays = _apply_duplicates(arrays, mode, _cache_root(builder))
  if split == "all":
    return arrays
  every = np.unique(np.concatenate(_allgather_rows(np.unique(arrays.subject))))
  rows = folds.select(arrays.subject, data_cfg.num_folds, data_cfg.fold, split,
                      all_subjects=every)
  return arrays.take(np.flatnonzero(rows))


# ------------------------------------------------------------------------- batches


def _local_batch(global_batch_size: int, mesh: Mesh, key: str) -> int:
  n_proc, n_dev = jax.process_count(), mesh.devices.size
  if global_batch_size <= 0:
    raise ValueError(f"{key}={global_batch_size} must be positive")
  if global_batch_size % n_proc:
    raise ValueError(f"{key}={global_batch_size} is not divisible by the {n_proc} "
                     "processes; use a multiple of the process count")
  if global_batch_size % n_dev:
    raise ValueError(f"{key}={global_batch_size} is not divisible by the {n_dev} devices "
                     "of the mesh (the batch is split over mesh.data x mesh.fsdp)")
  return global_batch_size // n_proc


def _finish(image, mask, has_nerve):
  """uint8 rows -> the training dtypes; runs on device, so only uint8 crosses over."""
  return {"image": preprocess.normalize(image),
          "mask": mask.astype(jnp.float32),
          "has_nerve": has_nerve.astype(jnp.float32)}


_LIVE_PREFETCHERS: "weakref.WeakSet[_Prefetch]" = weakref.WeakSet()


@atexit.register
def _stop_prefetchers() -> None:
  # A worker killed inside a JAX call at interpreter exit aborts the process, so
  # iterators that were never closed are stopped (and joined) first.
  for p in list(_LIVE_PREFETCHERS):
    p.close()


class _Prefetch:
  """Runs `produce(i)` for i = start, start+1, ... in a thread, `depth` ahead."""

  def __init__(self, produce: Callable[[int], Any], start: int, depth: int,
               stop_at: int | None = None):
    self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(produce, start, stop_at),
                                    daemon=True, name="nerveseg-prefetch")
    _LIVE_PREFETCHERS.add(self)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, produce, i, stop_at):
    try:
      while not self._stop.is_set() and (stop_at is None or i < stop_at):
        if not self._put(("ok", produce(i))):
          return
        i += 1
      self._put(("end", None))
    except BaseException as e:  # pylint: disable=broad-except
      self._put(("error", e))   # re-raised in the consumer, with its traceback

  def get(self):
    kind, value = self._q.get()
    if kind == "error":
      self.close()
      raise value
    if kind == "end":
      raise StopIteration
    return value

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)


def _device_bytes_limit(mesh: Mesh) -> int | None:
  try:
    stats = mesh.devices.flat[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def resident_fits(arrays: Arrays, mesh: Mesh) -> bool:
  """Whether the default holds the set on device: accelerators with room to spare.

  On CPU the "device" is host memory, the gather costs the same either way, and a copy
  per (fake) device only multiplies RAM, so the default there is the host gather.
  """
  if mesh.devices.flat[0].platform == "cpu":
    return False
  limit = _device_bytes_limit(mesh)
  per_device = arrays.image.nbytes + arrays.mask.nbytes + arrays.has_nerve.nbytes
  return limit is not None and per_device <= _RESIDENT_SHARE * limit


class TrainIterator:
  """Infinite training batches, deterministic in (seed, step), as global jax.Arrays.

  Step s takes the host-local rows s*b .. s*b+b-1 of an endless stream of per-epoch
  permutations of this process's frames (b = global_batch_size / process count), so a
  run resumed at start_step=s sees exactly what an uninterrupted run would. Yields
  {"image": float32 (B,H,W,1) normalised, "mask": float32 (B,H,W,1),
  "has_nerve": float32 (B,)} sharded over the mesh axes ('data', 'fsdp').
  `.step` is the step of the next batch (what a checkpoint stores).
  """

  def __init__(self, arrays: Arrays, global_batch_size: int, mesh: Mesh, *, seed: int,
               start_step: int = 0, device_resident: bool | None = None,
               prefetch: int = 2, config_key: str = "batch_size"):
    self.local_batch = _local_batch(int(global_batch_size), mesh, config_key)
    self.global_batch = int(global_batch_size)
    if not len(arrays):
      raise ValueError(f"process {jax.process_index()} has no training frames: check "
                       "data.num_folds, data.fold and data.duplicates against the data")
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0")
    self._arrays = arrays
    self._n = len(arrays)
    self._seed = int(seed)
    self._mesh = mesh
    self._sharding = NamedSharding(mesh, P(BATCH_AXES))
    self._perms: dict[int, np.ndarray] = {}
    self._perm_lock = threading.Lock()
    self.device_resident = (resident_fits(arrays, mesh) if device_resident is None
                            else bool(device_resident))
    self._finish = jax.jit(_finish, out_shardings=self._sharding)
    if self.device_resident:
      self._setup_resident()
    self.step = int(start_step)
    # The worker holds only a weak reference, so a dropped iterator is collected
    # (and its worker stopped by __del__) rather than kept alive by its own thread.
    ref = weakref.ref(self)

    def produce(step: int) -> dict[str, jax.Array]:
      me = ref()
      if me is None:
        raise StopIteration
      return me._batch(step)  # pylint: disable=protected-access

    self._prefetch = _Prefetch(produce, self.step, prefetch)

  # Sampling --------------------------------------------------------------------

  def _perm(self, epoch: int) -> np.ndarray:
    with self._perm_lock:
      if epoch not in self._perms:
        if len(self._perms) > 4:
          self._perms.pop(min(self._perms))
        rng = np.random.default_rng([self._seed, jax.process_index(), epoch])
        self._perms[epoch] = rng.permutation(self._n)
      return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    """Host-local rows of step `step` (epochs are consecutive permutations)."""
    pos = step * self.local_batch + np.arange(self.local_batch, dtype=np.int64)
    epochs, offsets = np.divmod(pos, self._n)
    out = np.empty(self.local_batch, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._perm(int(e))[offsets[sel]]
    return out

  # Batch assembly --------------------------------------------------------------

  def _global(self, local: np.ndarray) -> jax.Array:
    shape = (self.global_batch, *local.shape[1:])
    return jax.make_array_from_process_local_data(self._sharding, local, shape)

  def _setup_resident(self) -> None:
    """Puts this process's whole set on each of its devices, as one global array.

    Row block d of the (devices * n_max, ...) array is device d's copy of its host's
    frames (padded to the longest host); the per-device gather below only ever reads
    its own block, so batches match the host path exactly.
    """
    n_max = _max_over_processes(self._n)
    n_dev = self._mesh.devices.size

    def put(x: np.ndarray) -> jax.Array:
      padded = np.zeros((n_max, *x.shape[1:]), x.dtype)
      padded[:len(x)] = x
      shape = (n_dev * n_max, *x.shape[1:])
      idx_map = self._sharding.addressable_devices_indices_map(shape)
      return jax.make_array_from_single_device_arrays(
          shape, self._sharding, [jax.device_put(padded, d) for d in idx_map])

    a = self._arrays
    self._data = (put(a.image), put(a.mask), put(a.has_nerve))
    spec = P(BATCH_AXES)

    def gather(image, mask, has_nerve, idx):
      return _finish(image[idx], mask[idx], has_nerve[idx])

    # Per-device code is truly needed here: each device indexes its own copy.
    self._gather = jax.jit(jax.shard_map(
        gather, mesh=self._mesh, in_specs=(spec, spec, spec, spec),
        out_specs={"image": spec, "mask": spec, "has_nerve": spec}))

  def _batch(self, step: int) -> dict[str, jax.Array]:
    idx = self.indices(step)
    if self.device_resident:
      return self._gather(*self._data, self._global(idx.astype(np.int32)))
    a = self._arrays
    return self._finish(self._global(a.image[idx]), self._global(a.mask[idx]),
                        self._global(a.has_nerve[idx]))

  # Iterator protocol -----------------------------------------------------------

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = self._prefetch.get()
    self.step += 1
    return batch

  def close(self) -> None:
    self._prefetch.close()

  def __del__(self):
    prefetch = getattr(self, "_prefetch", None)
    if prefetch is not None:
      prefetch._stop.set()  # pylint: disable=protected-access


def eval_batches(arrays: Arrays, global_batch_size: int, mesh: Mesh, *,
                 prefetch: int = 2, config_key: str = "eval_batch_size"
                 ) -> Iterator[dict[str, jax.Array]]:
  """Every frame of every process exactly once, in order, padded to whole batches.

  Yields the TrainIterator dict plus "valid" bool (B,) and "index" int32 (B,): the row
  in this process's `arrays`, -1 for padding. All processes yield the same number of
  batches (set by the process holding the most frames), as collectives require.
  """
  local = _local_batch(int(global_batch_size), mesh, config_key)
  sharding = NamedSharding(mesh, P(BATCH_AXES))
  finish = jax.jit(_finish, out_shardings=sharding)
  n = len(arrays)
  num_batches = -(-_max_over_processes(n) // local)
  h, w = arrays.image.shape[1:3]

  def glob(x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(
        sharding, x, (int(global_batch_size), *x.shape[1:]))

  def produce(i: int) -> dict[str, jax.Array]:
    rows = i * local + np.arange(local)
    valid = rows < n
    idx = np.where(valid, rows, 0)
    if n:
      image, mask, has = arrays.image[idx], arrays.mask[idx], arrays.has_nerve[idx]
      # Padding rows are zeros, so nothing of a real frame leaks into them.
      image[~valid], mask[~valid], has[~valid] = 0, 0, False
    else:
      image = np.zeros((local, h, w, 1), np.uint8)
      mask, has = image.copy(), np.zeros(local, bool)
    batch = finish(glob(image), glob(mask), glob(has))
    batch["valid"] = glob(valid)
    batch["index"] = glob(np.where(valid, rows, -1).astype(np.int32))
    return batch

  if not num_batches:
    return
  pf = _Prefetch(produce, 0, prefetch, stop_at=num_batches)
  try:
    while True:
      try:
        yield pf.get()
      except StopIteration:
        return
  finally:
    pf.close()


# -------------------------------------------------------------------- measurement


def measure_throughput(config: ml_collections.ConfigDict, steps: int = 50, *,
                       device_resident: bool | None = None, warmup: int = 5,
                       with_augment: bool = False) -> dict[str, Any]:
  """Images/s of TrainIterator (optionally plus on-device augmentation) on this machine."""
  from nerveseg_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from nerveseg_jax.data import augment  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  arrays = load_arrays(config.data, "train")
  load_s = time.perf_counter() - t0
  mesh = sharding_lib.make_mesh(config.mesh)
  it = TrainIterator(arrays, int(config.batch_size), mesh, seed=int(config.seed),
                     device_resident=device_resident)
  aug = jax.jit(lambda k, b: augment.augment(k, b["image"], b["mask"], config.data.augment))
  key = jax.random.key(0)
  try:
    def one():
      b = next(it)
      out = aug(jax.random.fold_in(key, it.step), b) if with_augment else b
      jax.block_until_ready(out)
    for _ in range(warmup):
      one()
    t = time.perf_counter()
    for _ in range(steps):
      one()
    dt = time.perf_counter() - t
  finally:
    it.close()
  return {"images_per_sec": steps * int(config.batch_size) / dt,
          "steps_per_sec": steps / dt, "steps": steps,
          "batch_size": int(config.batch_size),
          "image_size": list(preprocess.check_size(config.data.image_size,
                                                   "data.image_size")),
          "train_frames": len(arrays), "load_seconds": load_s,
          "device_resident": it.device_resident, "with_augment": with_augment,
          "devices": jax.device_count(), "platform": jax.devices()[0].platform}


def main(argv: list[str] | None = None) -> int:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 50, "timed steps (after 5 warm-up steps)")
  flags.DEFINE_enum("device_resident", "auto", ["auto", "on", "off"],
                    "hold the set on device and gather there")
  flags.DEFINE_bool("augment", False, "include the on-device augmentation in the timing")
  flags.mark_flag_as_required("config")

  def run(_):
    f = flags.FLAGS
    resident = {"auto": None, "on": True, "off": False}[f.device_resident]
    r = measure_throughput(f.config, f.steps, device_resident=resident,
                           with_augment=f.augment)
    print(", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.items()))

  app.run(run, argv=argv or sys.argv)
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  sys.exit(main())
