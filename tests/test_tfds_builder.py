"""The ultrasound_nerve TFDS builder and tfds_source.build on tiny synthetic trees."""

import csv
import io
import pathlib
import shutil
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from nerveseg_jax import rle
from nerveseg_jax.configs import common
from nerveseg_jax.data import synthetic
from nerveseg_jax.data import tfds_source
from nerveseg_jax.datasets.ultrasound_nerve import ultrasound_nerve_dataset_builder as und

BadInput = und.BadInputError


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
  """2 subjects x 4 frames, 4 test frames; read-only for the tests (copy to modify)."""
  return synthetic.write_tree(tmp_path_factory.mktemp("syn") / "tree", subjects=2,
                              frames=4, test_subjects=1, seed=3)


def _copy(tree: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(tree, tmp_path / "copy"))


def _build(manual_dir, data_dir, config="kaggle") -> tfds.core.DatasetBuilder:
  b = und.Builder(config=config, data_dir=str(data_dir))
  b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return b


def _examples(builder, split="train") -> dict[str, dict]:
  return {ex["id"].decode(): ex
          for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def _tif(path: pathlib.Path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im)


def _kaggle_zip(tree: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  """The Kaggle CLI's zip: nested train.zip / test.zip next to the CSVs."""
  def nested(sub: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
      for p in sorted((tree / sub).iterdir()):
        z.write(p, f"{sub}/{p.name}")
    return buf.getvalue()

  with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("train.zip", nested("train"))
    z.writestr("test.zip", nested("test"))
    z.write(tree / "train_masks.csv", "train_masks.csv")
    z.write(tree / "sample_submission.csv", "sample_submission.csv")
  return out


def test_kaggle_tree(tree, tmp_path):
  b = _build(tree, tmp_path)
  assert b.is_prepared()
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 8, "test": 4}
  train = _examples(b)
  rows = {f"{r['subject']}_{r['img']}": r["pixels"]
          for r in csv.DictReader(open(tree / "train_masks.csv"))}
  assert set(train) == set(rows)
  for key, ex in train.items():
    assert ex["image"].shape == ex["mask"].shape == (420, 580, 1)
    np.testing.assert_array_equal(ex["image"][..., 0], _tif(tree / "train" / f"{key}.tif"))
    np.testing.assert_array_equal(ex["mask"][..., 0], rle.decode(rows[key]))
    assert ex["subject"] == int(key.split("_")[0])
    assert ex["labeled"] and ex["has_nerve"] == bool(rows[key])
  test = _examples(b, "test")
  assert set(test) == {str(n) for n in range(1, 5)}
  for key, ex in test.items():
    np.testing.assert_array_equal(ex["image"][..., 0], _tif(tree / "test" / f"{key}.tif"))
    assert not ex["mask"].any() and not ex["labeled"] and not ex["has_nerve"]
    assert ex["subject"] == -1


def test_kaggle_zip_with_nested_zips_matches_tree(tree, tmp_path):
  zip_path = _kaggle_zip(tree, tmp_path / "renamed_download.zip")
  cfg = common.data_config()
  cfg.source, cfg.manual_dir, cfg.data_dir = "kaggle", str(zip_path), str(tmp_path / "d")
  b = tfds_source.build(cfg)
  from_zip = _examples(b)
  from_tree = _examples(_build(tree, tmp_path / "t"))
  assert set(from_zip) == set(from_tree) and len(_examples(b, "test")) == 4
  for k in from_tree:
    for f in ("image", "mask", "subject", "has_nerve"):
      np.testing.assert_array_equal(from_zip[k][f], from_tree[k][f])


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "train/../../x.tif"])
def test_zip_member_escaping_is_refused(tree, tmp_path, member):
  d = tmp_path / "m"
  d.mkdir()
  _kaggle_zip(tree, d / und.KAGGLE_ZIP)
  with zipfile.ZipFile(d / und.KAGGLE_ZIP, "a") as z:
    z.writestr(zipfile.ZipInfo(member), b"x")
  with pytest.raises(BadInput, match=f"refusing zip member '{member}'"):
    _build(d, tmp_path / "out")


def test_folder_config_gray_rgb_jpeg_png_any_size(tree, tmp_path):
  src = tmp_path / "folder"
  (src / "images").mkdir(parents=True)
  (src / "masks").mkdir()
  truth = {}
  for i, key in enumerate(["1_1", "1_2", "1_3", "2_4"]):
    image, mask = _tif(tree / "train" / f"{key}.tif"), _tif(tree / "train" / f"{key}_mask.tif")
    if i % 2:  # RGB JPEG image, lossy JPEG mask, at a different size
      Image.fromarray(np.stack([image] * 3, -1)).resize((290, 210)).save(
          src / "images" / f"{key}.jpg", quality=95)
      Image.fromarray(mask).resize((290, 210), Image.NEAREST).save(
          src / "masks" / f"{key}_mask.jpg", quality=75)
      truth[key] = np.asarray(Image.fromarray(mask).resize((290, 210), Image.NEAREST)) > 0
    else:
      Image.fromarray(image).save(src / "images" / f"{key}.png")
      Image.fromarray(mask).save(src / "masks" / f"{key}_mask.png")
      truth[key] = mask > 0
  cfg = common.data_config()
  cfg.source, cfg.manual_dir, cfg.data_dir = "folder", str(src), str(tmp_path / "d")
  b = tfds_source.build(cfg)
  assert list(b.info.splits) == ["train"]
  # Keyed by the folder's absolute path, so two folders never share a build.
  assert str(tmp_path / "d" / "folder") in b.data_dir
  ex = _examples(b)
  assert set(ex) == set(truth)
  for key, t in truth.items():
    m = ex[key]["mask"][..., 0]
    assert ex[key]["image"].shape[:2] == t.shape and set(np.unique(m)) <= {0, 1}
    assert ex[key]["subject"] == int(key.split("_")[0]) and ex[key]["labeled"]
    if key.endswith(("1", "3")):  # PNG: exact
      np.testing.assert_array_equal(m, t)
    elif t.any():  # JPEG: binarised at 128, only edge pixels may flip
      assert (m != t).sum() < 0.05 * t.sum()


@pytest.mark.parametrize("case, match", [
    ("mask_without_image", "1_2_mask.tif: mask without its image"),
    ("image_without_mask", "1_2.tif: image without its mask"),
    ("non_binary_mask", "1_1_mask.tif: mask has values other than 0 and 255"),
    ("csv_disagrees", "1_1_mask.tif disagrees with .*train_masks.csv"),
    ("corrupt_image", "2_3.tif: cannot read image"),
    ("csv_row_missing_file", "train_masks.csv: lists 9_9"),
])
def test_kaggle_bad_input_names_the_file(tree, tmp_path, case, match):
  d = _copy(tree, tmp_path)
  t = d / "train"
  if case == "mask_without_image":
    (t / "1_2.tif").unlink()
  elif case == "image_without_mask":
    (t / "1_2_mask.tif").unlink()
  elif case == "non_binary_mask":
    m = _tif(t / "1_1_mask.tif").copy()
    m[0, :3] = 128
    Image.fromarray(m).save(t / "1_1_mask.tif")
  elif case == "csv_disagrees":
    Image.fromarray(np.zeros((420, 580), np.uint8)).save(t / "1_1_mask.tif")
    with open(d / "train_masks.csv", "w") as f:  # claims 1_1 has a nerve
      rows = csv.writer(f)
      rows.writerow(["subject", "img", "pixels"])
      for k in sorted(p.stem for p in t.glob("*_mask.tif")):
        s, i, _ = k.split("_")
        rows.writerow([s, i, "1 10" if k == "1_1_mask" else ""])
  elif case == "corrupt_image":
    (t / "2_3.tif").write_bytes((t / "2_3.tif").read_bytes()[:300])
  elif case == "csv_row_missing_file":
    with open(d / "train_masks.csv", "a") as f:
      f.write("9,9,\n")
  with pytest.raises(BadInput, match=match):
    _build(d, tmp_path / "out")


def test_failed_build_is_not_prepared_and_rebuilds_after_fix(tree, tmp_path):
  d = _copy(tree, tmp_path)
  good = (d / "test" / "4.tif").read_bytes()
  (d / "test" / "4.tif").write_bytes(b"not a tiff")  # fails midway: train is written
  with pytest.raises(BadInput, match="4.tif: cannot read image"):
    _build(d, tmp_path / "out")
  b = und.Builder(config="kaggle", data_dir=str(tmp_path / "out"))
  assert not b.is_prepared()
  (d / "test" / "4.tif").write_bytes(good)
  b = _build(d, tmp_path / "out")
  assert b.is_prepared() and b.info.splits["test"].num_examples == 4


@pytest.mark.parametrize("case, match", [
    ("mask_without_image", "a_mask.png: mask without its image"),
    ("image_without_mask", "b.png: image without its mask"),
    ("mask_name", "c.png: mask file names must be"),
])
def test_folder_bad_input_names_the_file(tmp_path, case, match):
  for sub in ("images", "masks"):
    (tmp_path / "f" / sub).mkdir(parents=True)
  img = Image.fromarray(np.zeros((8, 8), np.uint8))
  img.save(tmp_path / "f/images/ok.png")
  img.save(tmp_path / "f/masks/ok_mask.png")
  if case == "mask_without_image":
    img.save(tmp_path / "f/masks/a_mask.png")
  elif case == "image_without_mask":
    img.save(tmp_path / "f/images/b.png")
  else:
    img.save(tmp_path / "f/masks/c.png")
  with pytest.raises(BadInput, match=match):
    _build(tmp_path / "f", tmp_path / "out", "folder")


def test_missing_download_says_what_to_do(tmp_path):
  cfg = common.data_config()
  cfg.data_dir = str(tmp_path / "d")
  for manual in ("", str(tmp_path / "nope.zip"), str(tmp_path / "empty")):
    (tmp_path / "empty").mkdir(exist_ok=True)
    cfg.manual_dir = manual
    with pytest.raises(tfds_source.DataNotFoundError,
                       match=r"(?s)kaggle competitions download -c ultrasound-nerve-"
                             r"segmentation.*data\.manual_dir"):
      tfds_source.build(cfg)
  # The builder itself (tfds build CLI) says the same for a folder with no frames.
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "readme.txt").write_text("x")
  with pytest.raises(tfds_source.DataNotFoundError, match="kaggle competitions download"):
    _build(tmp_path / "other", tmp_path / "out")


def test_build_synthetic_generates_once(tmp_path):
  cfg = common.data_config()
  cfg.source, cfg.data_dir = "synthetic", str(tmp_path)
  cfg.synthetic_subjects, cfg.synthetic_frames, cfg.synthetic_seed = 2, 3, 1
  b = tfds_source.build(cfg)
  assert b.is_prepared()
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 6, "test": 6}
  raw = tmp_path / "synthetic_raw" / "s2_f3_seed1"
  assert (raw / "train_masks.csv").exists()
  assert str(tmp_path / "synthetic" / "s2_f3_seed1") in b.data_dir
  # Nothing half-written is left next to the tree.
  assert [p.name for p in raw.parent.iterdir()] == ["s2_f3_seed1"]
  stamp = (raw / "train_masks.csv").stat().st_mtime_ns
  b2 = tfds_source.build(cfg)
  assert b2.data_dir == b.data_dir
  assert (raw / "train_masks.csv").stat().st_mtime_ns == stamp
  ex = _examples(b2)
  assert {e["image"].shape for e in ex.values()} == {(420, 580, 1)}


def test_unknown_source_is_rejected(tmp_path):
  cfg = common.data_config()
  cfg.source, cfg.data_dir = "kagle", str(tmp_path)
  with pytest.raises(ValueError, match="data.source='kagle'"):
    tfds_source.build(cfg)


def test_staged_kaggle_dataset_needs_no_download(tree, tmp_path):
  # A cluster stages the prepared data_dir once; the hosts then train without the zip.
  cfg = common.data_config()
  cfg.source, cfg.data_dir, cfg.manual_dir = "kaggle", str(tmp_path / "d"), str(tree)
  first = tfds_source.build(cfg)
  cfg.manual_dir = ""
  again = tfds_source.build(cfg)
  assert again.is_prepared() and again.data_dir == first.data_dir
