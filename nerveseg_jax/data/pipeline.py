"""Resized host arrays -> global, sharded batches.

  load_arrays(data_cfg, split)   this process's frames of a split, resized once and
                                 cached (nerveseg_jax.data.arrays, re-exported here)
  TrainIterator(...)             infinite, deterministic in (seed, step), prefetched
  eval_batches(...)              padded batches with `valid`, every frame exactly once

Design: the set is small once resized (the Kaggle train set is ~130 MB at
128x176), so it is decoded and resized once, cached, and held in memory; a training
batch is a gather of rows. Augmentation runs on device inside the jitted train step
(nerveseg_jax.data.augment). Optionally the whole set also lives on every device and
the gather runs there (device_resident); see docs/data_pipeline.md for when.

Its speed: nerveseg-benchmark --config unet:synthetic --notrain --noinference.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nerveseg_jax.data import preprocess
from nerveseg_jax.data.arrays import (SPLITS, Arrays, cached_split, load_arrays,
                                      max_over_processes)

__all__ = ["SPLITS", "Arrays", "cached_split", "load_arrays", "BATCH_AXES", "TrainIterator",
           "eval_batches", "resident_fits"]

BATCH_AXES = ("data", "fsdp")
# device_resident=None holds the set on every device when one copy is at most this
# share of a device's memory (accelerators only; see docs/data_pipeline.md for CPU).
_RESIDENT_SHARE = 0.2


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
    n_max = max_over_processes(self._n)
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
  num_batches = -(-max_over_processes(n) // local)
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
