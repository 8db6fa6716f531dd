"""Input pipeline on a tiny synthetic set and 8 fake CPU devices (nerveseg_jax.data.pipeline)."""

import csv
import pathlib

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from nerveseg_jax.configs import unet
from nerveseg_jax.data import arrays as data_arrays, pipeline, preprocess

SIZE = (32, 48)


def _config(data_dir, **data):
  c = unet.get_config("smoke")
  c.data.data_dir = str(data_dir)
  c.data.synthetic_subjects = 4
  c.data.synthetic_frames = 8
  c.data.image_size = SIZE
  c.data.num_folds = 4
  c.data.update(data)
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  d = tmp_path_factory.mktemp("pipeline_data")
  pipeline.load_arrays(_config(d).data, "all")  # generates, builds and caches once
  return d


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8, 1), ("data", "fsdp"))


def test_arrays_shapes_dtypes_and_splits(data_dir):
  cfg = _config(data_dir).data
  every = pipeline.load_arrays(cfg, "all")
  assert len(every) == 32
  assert every.image.shape == (32, *SIZE, 1) and every.image.dtype == np.uint8
  assert every.mask.shape == (32, *SIZE, 1) and set(np.unique(every.mask)) <= {0, 1}
  assert every.has_nerve.dtype == bool and every.labeled.all()
  np.testing.assert_array_equal(every.has_nerve, every.mask.reshape(32, -1).any(1))
  assert every.subject.dtype == np.int32 and every.id.dtype.kind == "U"
  train, val = pipeline.load_arrays(cfg, "train"), pipeline.load_arrays(cfg, "val")
  assert not set(train.subject) & set(val.subject) and len(set(val.subject)) == 1
  assert sorted(train.id.tolist() + val.id.tolist()) == sorted(every.id.tolist())
  test = pipeline.load_arrays(cfg, "test")
  assert len(test) == 16 and not test.labeled.any() and test.image.shape[1:3] == SIZE
  everything = pipeline.load_arrays(_config(data_dir, fold=-1).data, "train")
  assert sorted(everything.id) == sorted(every.id)


def test_second_load_reads_the_cache(data_dir, monkeypatch):
  root = next(data_dir.rglob("nerveseg_cache"))
  assert any(p.name.startswith(f"train_{SIZE[0]}x{SIZE[1]}_p0of1") for p in root.iterdir())

  def fail(*args, **kwargs):
    raise AssertionError("decoded again despite the cache")

  monkeypatch.setattr(data_arrays, "_read_resized", fail)
  assert len(pipeline.load_arrays(_config(data_dir).data, "all")) == 32


def test_duplicates_option(data_dir):
  tree = next(data_dir.rglob("planted_duplicates.csv"))
  with open(tree, newline="") as f:
    planted = [(r["empty_id"], r["nerve_id"]) for r in csv.DictReader(f)]
  assert planted
  keep = pipeline.load_arrays(_config(data_dir).data, "all")
  drop = pipeline.load_arrays(_config(data_dir, duplicates="drop").data, "all")
  prop = pipeline.load_arrays(_config(data_dir, duplicates="propagate").data, "all")
  assert sorted(set(keep.id) - set(drop.id)) == sorted(e for e, _ in planted)
  for e, n in planted:
    row = lambda a, i: int(np.flatnonzero(a.id == i)[0])
    np.testing.assert_array_equal(prop.mask[row(prop, e)], keep.mask[row(keep, n)])
    assert prop.has_nerve[row(prop, e)] and not keep.has_nerve[row(keep, e)]


@pytest.mark.parametrize("key, value, match", [
    ("image_size", (0, 48), "data.image_size"),
    ("image_size", (32,), "data.image_size"),
    ("fold", 9, "data.fold"),
    ("duplicates", "maybe", "data.duplicates"),
])
def test_bad_config_is_named(data_dir, key, value, match):
  with pytest.raises(ValueError, match=match):
    pipeline.load_arrays(_config(data_dir, **{key: value}).data, "train")


def test_val_without_a_held_out_fold_is_an_error(data_dir):
  with pytest.raises(ValueError, match="data.fold=-1"):
    pipeline.load_arrays(_config(data_dir, fold=-1).data, "val")


def _host(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def _take(it, n):
  try:
    return [_host(next(it)) for _ in range(n)]
  finally:
    it.close()


def test_train_batches_shapes_dtypes_shardings(data_dir, mesh):
  arrays = pipeline.load_arrays(_config(data_dir).data, "train")
  it = pipeline.TrainIterator(arrays, 16, mesh, seed=0)
  assert it.step == 0 and not it.device_resident  # CPU default: host gather
  b = next(it)
  it.close()
  assert it.step == 1
  assert b["image"].shape == (16, *SIZE, 1) and b["image"].dtype == np.float32
  assert b["mask"].shape == (16, *SIZE, 1) and b["mask"].dtype == np.float32
  assert b["has_nerve"].shape == (16,) and b["has_nerve"].dtype == np.float32
  for v in b.values():
    assert v.sharding.spec == P(("data", "fsdp"))
    assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == 2
  assert float(b["image"].min()) >= -1 and float(b["image"].max()) <= 1
  # Rows are real frames: the has_nerve flag matches the mask.
  host = _host(b)
  np.testing.assert_array_equal(host["has_nerve"] > 0, host["mask"].reshape(16, -1).any(1))


def test_deterministic_by_seed_and_step_and_resumable(data_dir, mesh):
  arrays = pipeline.load_arrays(_config(data_dir).data, "train")
  run = _take(pipeline.TrainIterator(arrays, 8, mesh, seed=3), 6)
  again = _take(pipeline.TrainIterator(arrays, 8, mesh, seed=3), 6)
  resumed = _take(pipeline.TrainIterator(arrays, 8, mesh, seed=3, start_step=4), 2)
  other = _take(pipeline.TrainIterator(arrays, 8, mesh, seed=4), 1)
  for a, b in zip(run, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for a, b in zip(run[4:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(run[0]["image"], other[0]["image"])


def test_epochs_visit_every_frame_once(data_dir, mesh):
  arrays = pipeline.load_arrays(_config(data_dir).data, "train")  # 24 frames
  it = pipeline.TrainIterator(arrays, 8, mesh, seed=0)
  it.close()
  epoch = np.concatenate([it.indices(s) for s in range(3)])
  assert sorted(epoch) == list(range(24))
  assert not np.array_equal(epoch, np.concatenate([it.indices(s) for s in range(3, 6)]))


def test_device_resident_matches_host_gather(data_dir, mesh):
  arrays = pipeline.load_arrays(_config(data_dir).data, "train")
  host = _take(pipeline.TrainIterator(arrays, 8, mesh, seed=1, device_resident=False), 3)
  it = pipeline.TrainIterator(arrays, 8, mesh, seed=1, device_resident=True)
  dev = _take(it, 3)
  for a, b in zip(host, dev):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_batch_size_must_divide_over_devices(data_dir, mesh):
  arrays = pipeline.load_arrays(_config(data_dir).data, "train")
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
    pipeline.TrainIterator(arrays, 12, mesh, seed=0)
  with pytest.raises(ValueError, match="eval_batch_size=4"):
    next(pipeline.eval_batches(arrays, 4, mesh))


def test_eval_counts_every_frame_exactly_once(data_dir, mesh):
  arrays = pipeline.load_arrays(_config(data_dir).data, "val")  # 8 frames
  arrays = arrays.take(np.arange(7))                              # less than one batch
  batches = [_host(b) for b in pipeline.eval_batches(arrays, 16, mesh)]
  assert len(batches) == 1
  b = batches[0]
  assert b["valid"].dtype == bool and b["index"].dtype == np.int32
  np.testing.assert_array_equal(b["valid"], np.arange(16) < 7)
  np.testing.assert_array_equal(b["index"], np.where(np.arange(16) < 7, np.arange(16), -1))
  np.testing.assert_allclose(b["image"][:7], preprocess.normalize(arrays.image), atol=1e-6)
  np.testing.assert_array_equal(b["mask"][:7], arrays.mask.astype(np.float32))
  assert (b["mask"][7:] == 0).all() and (b["has_nerve"][7:] == 0).all()
  every = pipeline.load_arrays(_config(data_dir).data, "all")     # 32 frames, batch 24
  seen = np.concatenate([_host(b)["index"][_host(b)["valid"]]
                         for b in pipeline.eval_batches(every, 24, mesh)])
  assert sorted(seen) == list(range(32))


def test_other_fold_is_computed_at_load_time_without_a_rebuild(data_dir, monkeypatch):
  base = {f: set(pipeline.load_arrays(_config(data_dir, fold=f).data, "val").subject)
          for f in range(4)}

  def fail(*args, **kwargs):
    raise AssertionError("the data were decoded or built again for another fold")

  # Neither TFDS nor the resized cache is touched again: only the selection changes.
  monkeypatch.setattr(data_arrays, "_read_resized", fail)
  monkeypatch.setattr(
      "nerveseg_jax.datasets.ultrasound_nerve.ultrasound_nerve_dataset_builder."
      "Builder._download_and_prepare", fail)
  for f in range(4):
    cfg = _config(data_dir, fold=f, num_folds=4).data
    val, train = pipeline.load_arrays(cfg, "val"), pipeline.load_arrays(cfg, "train")
    assert set(val.subject) == base[f] and not set(val.subject) & set(train.subject)
  # Every subject is held out exactly once over the folds.
  assert sorted(s for v in base.values() for s in v) == [1, 2, 3, 4]


def test_each_process_reads_its_own_share_of_the_records(data_dir, monkeypatch):
  from nerveseg_jax.data import tfds_source
  builder = tfds_source.build(_config(data_dir).data)
  whole = pipeline.cached_split(builder, "train", SIZE)
  parts = []
  for index in range(3):  # as if this were process `index` of 3
    monkeypatch.setattr(data_arrays, "_process", lambda i=index: (i, 3))
    parts.append(pipeline.cached_split(builder, "train", SIZE))
  ids = [p.id.tolist() for p in parts]
  assert all(ids) and not set(ids[0]) & set(ids[1]) and not set(ids[1]) & set(ids[2])
  assert sorted(sum(ids, [])) == sorted(whole.id.tolist())
  for p in parts:  # the same frames, resized alike, whichever process holds them
    for i, key in enumerate(p.id):
      j = int(np.flatnonzero(whole.id == key)[0])
      np.testing.assert_array_equal(p.image[i], whole.image[j])
  root = next(data_dir.rglob("nerveseg_cache"))
  assert {f"p{i}of3" for i in range(3)} <= {n for p in root.iterdir()
                                           for n in p.name.split("_") if "of" in n}


def test_prefetch_runs_ahead_of_the_consumer(data_dir, mesh):
  import time
  arrays = pipeline.load_arrays(_config(data_dir).data, "train")
  it = pipeline.TrainIterator(arrays, 8, mesh, seed=0, prefetch=3)
  try:
    deadline = time.monotonic() + 60
    # Nothing has been asked for yet, and the worker already holds 3 ready batches.
    while not it._prefetch._q.full() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert it._prefetch._q.qsize() == 3 and it.step == 0
    first = _host(next(it))
  finally:
    it.close()
  assert not it._prefetch._thread.is_alive()
  np.testing.assert_array_equal(first["image"], _take(
      pipeline.TrainIterator(arrays, 8, mesh, seed=0, prefetch=0), 1)[0]["image"])
