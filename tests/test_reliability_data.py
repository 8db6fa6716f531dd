"""A built dataset is never used after its source changed; archive limits of the builder."""

import csv
import hashlib
import io
import os
import pathlib
import shutil
import types
import zipfile

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image
import pytest

from nerveseg_jax.configs import common
from nerveseg_jax.data import arrays as data_arrays
from nerveseg_jax.data import synthetic
from nerveseg_jax.data import tfds_source
from nerveseg_jax.datasets.ultrasound_nerve import ultrasound_nerve_dataset_builder as und

SIZE = (16, 24)  # small: these tests are about which frames arrive, not their pixels


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
  """2 subjects x 3 frames, 2 test frames; read-only (tests change copies)."""
  return synthetic.write_tree(tmp_path_factory.mktemp("rel") / "tree", subjects=2,
                              frames=3, test_subjects=1, seed=5)


def _cfg(manual_dir, data_dir, source="kaggle"):
  c = common.data_config()
  c.source, c.manual_dir, c.data_dir = source, str(manual_dir), str(data_dir)
  c.image_size, c.fold = SIZE, -1
  return c


def _load(cfg) -> dict[str, tuple[np.ndarray, bool]]:
  a = data_arrays.load_arrays(cfg, "all")
  return {str(i): (m, bool(h)) for i, m, h in zip(a.id, a.mask, a.has_nerve)}


def _rows(tree: pathlib.Path) -> list[list[str]]:
  with open(tree / "train_masks.csv", newline="") as f:
    return list(csv.reader(f))


def _write_rows(tree: pathlib.Path, rows: list[list[str]]) -> None:
  with open(tree / "train_masks.csv", "w", newline="") as f:
    csv.writer(f).writerows(rows)


def _nerve_key(tree: pathlib.Path) -> str:
  return next(f"{s}_{i}" for s, i, px in _rows(tree)[1:] if px)


def _copy(tree, tmp_path, name="copy") -> pathlib.Path:
  return pathlib.Path(shutil.copytree(tree, tmp_path / name))


def _leftovers(data_dir: pathlib.Path) -> list[str]:
  return [p.name for p in data_dir.rglob("*") if p.name.startswith((".rebuild", ".stale"))]


def test_added_frame_is_seen_by_the_next_run(tree, tmp_path):
  src = _copy(tree, tmp_path)
  cfg = _cfg(src, tmp_path / "d")
  before = _load(cfg)
  for suffix in ("", "_mask"):
    shutil.copy(src / "train" / f"1_1{suffix}.tif", src / "train" / f"9_1{suffix}.tif")
  rows = _rows(src)
  rows.append(["9", "1", next(px for s, i, px in rows if (s, i) == ("1", "1"))])
  _write_rows(src, rows)
  after = _load(cfg)
  assert set(after) == set(before) | {"9_1"}
  np.testing.assert_array_equal(after["9_1"][0], after["1_1"][0])
  # The old build and its resized cache were replaced, not left beside the new ones.
  assert not _leftovers(tmp_path / "d")
  caches = list((tmp_path / "d").rglob("nerveseg_cache/train_*"))
  assert len(caches) == 1, caches


def test_removed_frame_is_seen_by_the_next_run(tree, tmp_path):
  src = _copy(tree, tmp_path)
  cfg = _cfg(src, tmp_path / "d")
  assert "1_2" in _load(cfg)
  (src / "train" / "1_2.tif").unlink()
  (src / "train" / "1_2_mask.tif").unlink()
  _write_rows(src, [r for r in _rows(src) if r[:2] != ["1", "2"]])
  after = _load(cfg)
  assert "1_2" not in after and len(after) == 5


def test_edited_mask_is_seen_by_the_next_run(tree, tmp_path):
  src = _copy(tree, tmp_path)
  cfg = _cfg(src, tmp_path / "d")
  key = _nerve_key(src)
  path = src / "train" / f"{key}_mask.tif"
  truth = np.asarray(Image.open(path))
  Image.fromarray(truth).save(path)  # uncompressed, so the edit below keeps its size
  size = path.stat().st_size
  mask, has = _load(cfg)[key]
  assert has and mask.any()
  Image.fromarray(np.zeros_like(truth)).save(path)
  assert path.stat().st_size == size  # same size: only the mtime tells the change
  _write_rows(src, [r[:2] + [""] if r[:2] == key.split("_") else r for r in _rows(src)])
  mask, has = _load(cfg)[key]
  assert not has and not mask.any()


def test_folder_source_sees_an_edited_mask(tree, tmp_path):
  src = tmp_path / "folder"
  for sub in ("images", "masks"):
    (src / sub).mkdir(parents=True)
  key = _nerve_key(tree)
  for k in (key, "2_1"):
    shutil.copy(tree / "train" / f"{k}.tif", src / "images" / f"{k}.tif")
    shutil.copy(tree / "train" / f"{k}_mask.tif", src / "masks" / f"{k}_mask.tif")
  cfg = _cfg(src, tmp_path / "d", "folder")
  assert _load(cfg)[key][1]
  shape = np.asarray(Image.open(src / "masks" / f"{key}_mask.tif")).shape
  Image.fromarray(np.zeros(shape, np.uint8)).save(src / "masks" / f"{key}_mask.tif")
  assert not _load(cfg)[key][1]


def test_manual_dir_pointed_elsewhere_rebuilds(tree, tmp_path):
  other = synthetic.write_tree(tmp_path / "other", subjects=1, frames=2, test_subjects=1,
                               seed=9)
  data_dir = tmp_path / "d"
  assert len(_load(_cfg(tree, data_dir))) == 6
  assert set(_load(_cfg(other, data_dir))) == {"1_1", "1_2"}


def test_set_but_missing_manual_dir_is_an_error_even_when_built(tree, tmp_path):
  tfds_source.build(_cfg(tree, tmp_path / "d"))
  with pytest.raises(tfds_source.DataNotFoundError,
                     match=r"data\.manual_dir='[^']*nowhere' does not exist"):
    tfds_source.build(_cfg(tmp_path / "nowhere", tmp_path / "d"))


def test_unchanged_synthetic_source_is_not_rebuilt(tmp_path):
  cfg = _cfg("", tmp_path)
  cfg.source, cfg.synthetic_subjects, cfg.synthetic_frames = "synthetic", 1, 2
  first = tfds_source.build(cfg)
  info = pathlib.Path(first.data_dir) / "dataset_info.json"
  stamp = (info.stat().st_ino, info.stat().st_mtime_ns)
  again = tfds_source.build(cfg)
  assert again.data_dir == first.data_dir
  assert (info.stat().st_ino, info.stat().st_mtime_ns) == stamp
  assert und.recorded_fingerprint(again) == und.recorded_fingerprint(first) != ""


def _zip_tree(tree: pathlib.Path, out: pathlib.Path, drop: str = "") -> pathlib.Path:
  """tree as one zip, without frame `drop` (its image, mask and CSV row)."""
  rows = [r for r in _rows(tree) if f"{r[0]}_{r[1]}" != drop]
  buf = io.StringIO()
  csv.writer(buf).writerows(rows)
  with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for p in sorted(tree.rglob("*")):
      if p.is_file() and p.name not in (f"{drop}.tif", f"{drop}_mask.tif",
                                        "train_masks.csv"):
        z.write(p, p.relative_to(tree).as_posix())
    z.writestr("train_masks.csv", buf.getvalue())
  return out


def test_zip_source_is_keyed_on_content_hashed_once(tree, tmp_path, monkeypatch):
  zip_path = _zip_tree(tree, tmp_path / "download.zip")
  cfg = _cfg(zip_path, tmp_path / "d")
  info = pathlib.Path(tfds_source.build(cfg).data_dir) / "dataset_info.json"
  inode = info.stat().st_ino
  # Fetched again (new mtime, same bytes): the same source, nothing rebuilt.
  os.utime(zip_path, ns=(1_000_000_000, 1_000_000_000))
  assert tfds_source.build(cfg).info.splits["train"].num_examples == 6
  assert info.stat().st_ino == inode
  # The hash is remembered: a later run does not read the zip again.
  def no_hash(path):
    raise AssertionError(f"{path} hashed again")
  monkeypatch.setattr(und, "file_sha256", no_hash)
  assert tfds_source.build(cfg).info.splits["train"].num_examples == 6
  monkeypatch.undo()
  # Other bytes: rebuilt.
  _zip_tree(tree, zip_path, drop="1_2")
  assert tfds_source.build(cfg).info.splits["train"].num_examples == 5


def test_processes_that_see_other_data_are_refused(monkeypatch):
  def fake(fp):
    return types.SimpleNamespace(info=types.SimpleNamespace(
        metadata={"source_fingerprint": fp}))
  cfg = common.data_config()
  cfg.manual_dir = "/data/kaggle"
  other = [None]

  def gather(x):  # process 1's digest, as the other host would send it
    theirs = np.frombuffer(hashlib.sha256(other[0].encode()).digest(), np.uint8)
    return np.stack([x, theirs])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", gather)
  other[0] = "abc"
  data_arrays._check_processes_agree(fake("abc"), cfg)  # the same: no error
  other[0] = "abd"
  with pytest.raises(ValueError, match=r"data\.manual_dir='/data/kaggle': process\(es\) "
                                       r"\[1\] read other data than process 0"):
    data_arrays._check_processes_agree(fake("abc"), cfg)


# ------------------------------------------------------------------- archive limits


def _download_dir(tmp_path, members: dict[str, bytes]) -> pathlib.Path:
  d = tmp_path / "m"
  d.mkdir()
  with zipfile.ZipFile(d / und.KAGGLE_ZIP, "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in members.items():
      z.writestr(name, data)
  return d


def _build(manual_dir, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = und.Builder(config="kaggle", data_dir=str(data_dir))
  b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return b


def _zip_bytes(members: dict[str, bytes]) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in members.items():
      z.writestr(name, data)
  return buf.getvalue()


def test_zip_member_over_the_size_cap_is_refused(tree, tmp_path, monkeypatch):
  monkeypatch.setattr(und, "_MAX_FILE_BYTES", 1 << 20)
  bomb = _zip_bytes({"train/1_1.tif": bytes(4 << 20)})  # 4 MiB of zeros: ~4 KB zipped
  d = _download_dir(tmp_path, {"train.zip": bomb,
                               "train_masks.csv": (tree / "train_masks.csv").read_bytes()})
  with pytest.raises(und.BadInputError,
                     match=r"train\.zip!train/1_1\.tif: zip member inflates to 4194304 "
                           r"bytes, over the 1048576-byte limit"):
    _build(d, tmp_path / "out")


def test_nested_zip_over_its_size_cap_is_refused(tree, tmp_path, monkeypatch):
  monkeypatch.setattr(und, "_MAX_NESTED_ZIP_BYTES", 10_000)
  inner = _zip_bytes({"train/1_1.tif": (tree / "train" / "1_1.tif").read_bytes()})
  d = _download_dir(tmp_path, {"train.zip": inner})
  with pytest.raises(und.BadInputError, match=rf"{und.KAGGLE_ZIP}!train\.zip: zip member "
                                              r"inflates to \d+ bytes, over the 10000"):
    _build(d, tmp_path / "out")


def test_member_larger_than_it_declares_is_refused(tmp_path):
  """A header that understates the size: zipfile stops at the declared size and the
  CRC then fails, so nothing past the declared size is inflated."""
  data = _zip_bytes({"train_masks.csv": b"subject,img,pixels\n" + bytes(1 << 20)})
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    info = z.getinfo("train_masks.csv")
  # The central directory's uncompressed size (offset 24 of its entry) claims 100 bytes.
  cd = data.rindex(b"PK\x01\x02")
  assert int.from_bytes(data[cd + 24:cd + 28], "little") == info.file_size
  data = data[:cd + 24] + (100).to_bytes(4, "little") + data[cd + 28:]
  d = _download_dir(tmp_path, {"train.zip": data})
  with pytest.raises(und.BadInputError, match=r"train\.zip!train_masks\.csv: corrupt zip "
                                              r"member \(Bad CRC-32"):
    _build(d, tmp_path / "out")


def test_zips_nested_too_deep_are_refused(tree, tmp_path):
  image = (tree / "train" / "1_1.tif").read_bytes()
  level = _zip_bytes({"train/1_1.tif": image})
  for name in ("d.zip", "c.zip"):
    level = _zip_bytes({name: level})
  d = _download_dir(tmp_path, {"b.zip": level})  # download > b > c > d: four deep
  with pytest.raises(und.BadInputError,
                     match=rf"{und.KAGGLE_ZIP}!b\.zip!c\.zip!d\.zip: zips nested more "
                           rf"than {und._MAX_ZIP_NESTING} deep"):
    _build(d, tmp_path / "out")


def test_resized_cache_key_follows_the_recorded_source(tmp_path):
  """Two builds whose dataset_info.json match byte for byte (an edit that leaves every
  shard's size alone) still get different cache keys."""
  (tmp_path / "dataset_info.json").write_text('{"splits": []}')

  def fake(fp):
    return types.SimpleNamespace(data_dir=str(tmp_path), info=types.SimpleNamespace(
        metadata={"source_fingerprint": fp}))
  key = data_arrays._dataset_fingerprint
  assert key(fake("a")) == key(fake("a")) != key(fake("b"))


def test_renamed_download_is_the_same_source(tree, tmp_path):
  """A zip is its bytes: the file's name (the staged link is always the Kaggle name,
  a folder may hold any name) does not make it another source."""
  (tmp_path / "a").mkdir()
  zip_path = _zip_tree(tree, tmp_path / "a" / "my_download.zip")
  folder = und.source_fingerprint("kaggle", tmp_path / "a")
  cfg = _cfg(zip_path, tmp_path / "d")
  built = tfds_source.build(cfg)
  assert und.recorded_fingerprint(built) == folder
