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


def img_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt)
  return buf.getvalue()


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
    ("corrupt_image", "2_3.tif: (corrupt or unreadable|not a recognised) image"),
    ("corrupt_mask", "2_1_mask.tif: (corrupt or unreadable|not a recognised) image"),
    ("csv_row_missing_file", "train_masks.csv: lists 9_9"),
    ("csv_bad_rle", "train_masks.csv: row 1_1: RLE has an odd number of values"),
    ("mask_size", "1_3_mask.tif: mask is 290x210 but its image is 580x420"),
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
  elif case == "corrupt_mask":
    (t / "2_1_mask.tif").write_bytes(b"II*\x00 this is no tiff")
  elif case == "csv_row_missing_file":
    with open(d / "train_masks.csv", "a") as f:
      f.write("9,9,\n")
  elif case == "csv_bad_rle":
    text = (d / "train_masks.csv").read_text().splitlines()
    text = [("1,1,1 2 3" if line.startswith("1,1,") else line) for line in text]
    (d / "train_masks.csv").write_text("\n".join(text) + "\n")
  elif case == "mask_size":
    Image.fromarray(np.zeros((210, 290), np.uint8)).save(t / "1_3_mask.tif")
  with pytest.raises(BadInput, match=match):
    _build(d, tmp_path / "out")


def test_failed_build_is_not_prepared_and_rebuilds_after_fix(tree, tmp_path):
  d = _copy(tree, tmp_path)
  good = (d / "test" / "4.tif").read_bytes()
  (d / "test" / "4.tif").write_bytes(b"not a tiff")  # fails midway: train is written
  with pytest.raises(BadInput, match="4.tif: not a recognised image"):
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
    ("same_stem", "ok.png: same stem as .*ok.jpg"),
    ("corrupt_image", "images/d.png: (corrupt or unreadable|not a recognised) image"),
    ("corrupt_mask", "masks/d_mask.png: (corrupt or unreadable|not a recognised) image"),
    ("mask_size", "e_mask.png: mask is 4x8 but e.png is 8x8"),
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
  elif case == "mask_name":
    img.save(tmp_path / "f/masks/c.png")
  elif case == "same_stem":
    img.save(tmp_path / "f/images/ok.jpg")
  elif case == "corrupt_image":
    (tmp_path / "f/images/d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    img.save(tmp_path / "f/masks/d_mask.png")
  elif case == "corrupt_mask":
    img.save(tmp_path / "f/images/d.png")
    (tmp_path / "f/masks/d_mask.png").write_bytes(img_bytes(img)[:40])
  else:
    img.save(tmp_path / "f/images/e.png")
    Image.fromarray(np.zeros((8, 4), np.uint8)).save(tmp_path / "f/masks/e_mask.png")
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
  key = f"s2_f3_seed1_g{synthetic.GENERATOR_VERSION}"  # a new generator, a new tree
  raw = tmp_path / "synthetic_raw" / key
  assert (raw / "train_masks.csv").exists()
  assert str(tmp_path / "synthetic" / key) in b.data_dir
  # Nothing half-written is left next to the tree.
  assert [p.name for p in raw.parent.iterdir()] == [key]
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


def test_folder_16_bit_images_and_0_1_masks(tmp_path):
  """Any format PIL reads: a 16-bit frame is scaled by its type's range, and masks
  saved as 0/1 (or as 1-bit) are read as masks, not thresholded away at 128."""
  for sub in ("images", "masks"):
    (tmp_path / "f" / sub).mkdir(parents=True)
  wide = np.linspace(0, 65535, 12 * 16).reshape(12, 16).astype(np.uint16)
  Image.fromarray(wide).save(tmp_path / "f/images/5_1.png")
  nerve = np.zeros((12, 16), np.uint8)
  nerve[3:8, 4:11] = 1
  Image.fromarray(nerve).save(tmp_path / "f/masks/5_1_mask.png")  # values 0 and 1
  Image.fromarray(wide).save(tmp_path / "f/images/5_2.tif")
  Image.fromarray(nerve.astype(bool)).save(tmp_path / "f/masks/5_2_mask.png")  # mode "1"
  ex = _examples(_build(tmp_path / "f", tmp_path / "out", "folder"))
  want = np.round(wide * (255.0 / 65535.0)).astype(np.uint8)
  for key in ("5_1", "5_2"):
    np.testing.assert_array_equal(ex[key]["image"][..., 0], want)
    np.testing.assert_array_equal(ex[key]["mask"][..., 0], nerve)
    assert ex[key]["has_nerve"] and ex[key]["subject"] == 5


def test_nested_zip_member_escaping_is_refused(tree, tmp_path):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.write(tree / "train" / "1_1.tif", "train/1_1.tif")
    z.writestr(zipfile.ZipInfo("train/../../../escape.tif"), b"x")
  d = tmp_path / "m"
  d.mkdir()
  with zipfile.ZipFile(d / und.KAGGLE_ZIP, "w") as z:
    z.writestr("train.zip", buf.getvalue())
    z.write(tree / "train_masks.csv", "train_masks.csv")
  with pytest.raises(BadInput, match=r"train\.zip: refusing zip member "
                                     r"'train/\.\./\.\./\.\./escape\.tif'"):
    _build(d, tmp_path / "out")
  assert not (tmp_path / "escape.tif").exists()


def test_folder_config_reads_the_real_subset_layout(shared_data, tmp_path):
  """../shared/data/nerve_real_subset (RGB JPEG 256x256, lossy masks) is a folder set."""
  real = shared_data / "nerve_real_subset"
  if not real.exists():
    pytest.skip(f"{real} is not present")
  # Two frames each of two subjects.
  keys = [k for s in ("1", "2")
          for k in sorted(p.stem for p in (real / "images").glob(f"{s}_*.jpg"))[:2]]
  assert len(keys) == 4, keys
  for sub in ("images", "masks"):
    (tmp_path / "f" / sub).mkdir(parents=True)
  for k in keys:  # links, not copies: the real data stay in ../shared/data
    (tmp_path / "f/images" / f"{k}.jpg").symlink_to(real / "images" / f"{k}.jpg")
    (tmp_path / "f/masks" / f"{k}_mask.jpg").symlink_to(real / "masks" / f"{k}_mask.jpg")
  ex = _examples(_build(tmp_path / "f", tmp_path / "out", "folder"))
  assert sorted(ex) == sorted(keys)
  for k, e in ex.items():
    with Image.open(real / "images" / f"{k}.jpg") as im:
      assert im.mode == "RGB"
      gray = np.asarray(im.convert("L"))
    with Image.open(real / "masks" / f"{k}_mask.jpg") as im:
      truth = np.asarray(im.convert("L")) >= 128
    assert e["image"].shape == e["mask"].shape == (256, 256, 1)
    np.testing.assert_array_equal(e["image"][..., 0], gray)
    np.testing.assert_array_equal(e["mask"][..., 0], truth)
    assert set(np.unique(e["mask"])) == {0, 1} and e["has_nerve"]  # every frame has one
    assert e["subject"] == int(k.split("_")[0]) and e["labeled"]


_REPO = pathlib.Path(__file__).resolve().parents[1]

# Run in a fresh interpreter against the unpacked wheel only (PYTHONPATH first, so the
# editable install of the checkout is never reached), from a folder outside the repo.
_FROM_WHEEL = r"""
import importlib.util, json, pathlib, sys
site, tree, out = map(pathlib.Path, sys.argv[1:4])
import nerveseg_jax
from nerveseg_jax.configs import common
from nerveseg_jax.data import tfds_source
from nerveseg_jax.datasets.ultrasound_nerve import ultrasound_nerve_dataset_builder as und
spec = importlib.util.find_spec("datasets")
cfg = common.data_config()
cfg.source, cfg.manual_dir, cfg.data_dir = "kaggle", str(tree), str(out)
b = tfds_source.build(cfg)
print(json.dumps({
    "package": nerveseg_jax.__file__, "builder": und.__file__,
    "datasets": spec.origin if spec else None,
    "splits": {k: v.num_examples for k, v in b.info.splits.items()},
    "dummy_data": (pathlib.Path(und.__file__).parent / "dummy_data" / "train_masks.csv").is_file(),
}))
"""

# What `tfds build datasets/ultrasound_nerve ...` runs: the CLI's own `build` command
# parser and execute(). (The `tfds` entry point itself also imports apache_beam and
# mlcroissant at start-up, the tfds-cli extra; this is the same code after that.)
_TFDS_BUILD = r"""
import sys
from tensorflow_datasets.scripts.cli import build, cli_utils
cli_utils.make_flags_parser(build.Args, "tfds build")(["build", *sys.argv[1:]]).execute()
"""


def test_non_editable_wheel_and_tfds_build_cli(tree, tmp_path):
  import subprocess
  import sys
  src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the repo
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  for name in ("nerveseg_jax", "configs", "datasets"):
    shutil.copytree(_REPO / name, src / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(_REPO / name, src / name)
  built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                          str(tmp_path / "wheel"), str(src)],
                         capture_output=True, text=True, timeout=300)
  assert built.returncode == 0, built.stderr[-3000:]
  wheel = next((tmp_path / "wheel").glob("nerveseg_jax-*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  # Nothing claims the top-level name `datasets` (Hugging Face's package).
  assert {n.split("/")[0] for n in names} == {"nerveseg_jax", wheel.name.split("-py")[0]
                                             + ".dist-info"}
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(site)
  run = subprocess.run([sys.executable, "-c", _FROM_WHEEL, str(site), str(tree),
                        str(tmp_path / "d")], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  got = __import__("json").loads(run.stdout.strip().splitlines()[-1])
  assert got["package"].startswith(str(site)) and got["builder"].startswith(str(site))
  assert got["datasets"] is None or not got["datasets"].startswith(str(site))
  assert got["splits"] == {"train": 8, "test": 4} and got["dummy_data"]

  # The CLI on the builder folder, from the repo root as the README says.
  def tfds_build(*flags):
    return subprocess.run([sys.executable, "-c", _TFDS_BUILD, "datasets/ultrasound_nerve",
                           f"--manual_dir={tree}", *flags], capture_output=True,
                          text=True, cwd=_REPO, env=env, timeout=300)
  cli = tfds_build(f"--data_dir={tmp_path / 'cli'}", "--config=kaggle")
  assert cli.returncode == 0, cli.stderr[-3000:]
  b = und.Builder(config="kaggle", data_dir=str(tmp_path / "cli"))
  assert b.is_prepared() and b.info.splits["train"].num_examples == 8
  # Without --config the CLI builds every config: kaggle is built, and the folder
  # config says why it cannot use a Kaggle download and what to pass instead.
  every = tfds_build(f"--data_dir={tmp_path / 'all'}")
  assert every.returncode != 0
  assert "ultrasound_nerve/folder: no data found" in every.stderr
  assert "--config=kaggle" in every.stderr
  assert und.Builder(config="kaggle", data_dir=str(tmp_path / "all")).is_prepared()
