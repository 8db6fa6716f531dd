"""predict: image reading, corrupt-file handling, and the end-to-end submission."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from nerveseg_jax import imageio


def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def test_reads_any_format_size_and_channels(tmp_path, shared_data):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
  for fmt, suffix in (("TIFF", ".tif"), ("PNG", ".png")):
    (tmp_path / f"g{suffix}").write_bytes(_encode(gray, fmt))
    np.testing.assert_array_equal(imageio.read_gray(tmp_path / f"g{suffix}"), gray)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  (tmp_path / "rgb.png").write_bytes(_encode(rgb, "PNG"))
  np.testing.assert_array_equal(imageio.read_gray(tmp_path / "rgb.png"), gray)
  wide = (gray.astype(np.uint16) * 257)                  # 16-bit scan keeps its contrast
  (tmp_path / "w16.png").write_bytes(_encode(wide, "PNG"))
  np.testing.assert_array_equal(imageio.read_gray(tmp_path / "w16.png"), gray)
  kaggle = imageio.read_gray(shared_data / "kaggle_originals" / "1_1.tif")
  assert kaggle.shape == (420, 580) and kaggle.dtype == np.uint8
  jpg = imageio.read_gray(shared_data / "nerve_real_subset" / "images" / "1_1.jpg")
  assert jpg.shape == (256, 256)
  mask = imageio.read_mask(shared_data / "kaggle_originals" / "1_1_mask.tif")
  assert set(np.unique(mask)) <= {0, 1}


def test_bad_files_name_the_file(tmp_path):
  good = _encode(np.zeros((20, 30), np.uint8), "PNG")
  cases = {"empty.png": b"", "text.png": b"not an image at all",
           "truncated.png": good[:len(good) // 2]}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(imageio.ImageReadError, match=name):
      imageio.read_gray(tmp_path / name)
  with pytest.raises(imageio.ImageReadError, match="missing.tif"):
    imageio.read_gray(tmp_path / "missing.tif")


def test_list_inputs_orders_numbers_and_ignores_masks(tmp_path):
  png = _encode(np.zeros((4, 4), np.uint8), "PNG")
  for name in ("10.tif", "2.tif", "1.tif", "1_mask.tif", "notes.txt"):
    (tmp_path / name).write_bytes(png)
  images, ignored = imageio.list_inputs(tmp_path)
  assert [p.name for p in images] == ["1.tif", "2.tif", "10.tif"]
  assert sorted(p.name for p in ignored) == ["1_mask.tif", "notes.txt"]
  assert imageio.list_inputs(tmp_path / "2.tif") == ([tmp_path / "2.tif"], [])
  with pytest.raises(FileNotFoundError, match="nowhere"):
    imageio.list_inputs(tmp_path / "nowhere")


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def calibrated(smoke_run, calibrated_run):
  return smoke_run, calibrated_run


def test_predict_folder_end_to_end(calibrated, tmp_path, capsys):
  from nerveseg_jax import metrics, predict, rle
  root, workdir = calibrated
  images = tmp_path / "images"
  shutil.copytree(root / "raw" / "test", images)
  names = sorted((p.stem for p in images.glob("*.tif")), key=int)
  good = (images / names[0]).with_suffix(".tif").read_bytes()
  (images / "broken.tif").write_bytes(good[:len(good) // 3])        # corrupt
  (images / "notes.txt").write_text("not a frame")                  # ignored
  out = tmp_path / "out"
  rc = predict.main(["--workdir", str(workdir), "--images", str(images), "--output", str(out),
                     "--batch_size", "8"])
  assert rc == 1                                                     # one file failed
  printed = capsys.readouterr()
  assert "broken.tif" in printed.out + printed.err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["files"] == len(names) + 2 and summary["processed"] == len(names)
  assert summary["failed"] == 1 and summary["ignored"] == 1
  assert summary["nerve_found"] + summary["no_nerve_found"] == len(names)
  assert "broken.tif" in summary["failures"][0]["error"]

  with open(out / "submission.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["img", "pixels"]
  assert [r[0] for r in rows[1:]] == names                           # numeric order
  pred = {}
  for img, pixels in rows[1:]:
    mask = rle.decode(pixels)
    np.testing.assert_array_equal(mask * 255, np.asarray(Image.open(out / "masks" / f"{img}.png")))
    assert np.asarray(Image.open(out / "overlays" / f"{img}.png")).shape == (420, 580, 3)
    pred[img] = mask
  assert (out / "report.html").exists()

  # Better than the all-empty submission on the hidden truth of the synthetic test set.
  with open(root / "raw" / "test_truth.csv", newline="") as f:
    truth = {r["img"]: rle.decode(r["pixels"]) for r in csv.DictReader(f)}
  t = np.stack([truth[n] for n in names])
  score = float(np.mean(metrics.dice_per_example(np.stack([pred[n] for n in names]), t)))
  empty = float(np.mean(metrics.dice_per_example(np.zeros_like(t), t)))
  assert 0.0 < empty < 1.0                                           # both kinds of frame
  assert score > empty, (score, empty)


def test_predict_single_file_and_bad_arguments(calibrated, tmp_path, capsys):
  from nerveseg_jax import predict
  root, workdir = calibrated
  frame = imageio.read_gray(root / "raw" / "test" / "1.tif")
  rgb = np.repeat(frame[::2, ::2, None], 3, axis=-1)                 # another size, RGB
  (tmp_path / "scan.png").write_bytes(_encode(rgb, "PNG"))
  out = tmp_path / "out"
  assert predict.main(["--workdir", str(workdir), "--images", str(tmp_path / "scan.png"),
                       "--output", str(out)]) == 0
  assert np.asarray(Image.open(out / "masks" / "scan.png")).shape == (210, 290)
  assert predict.main(["--workdir", str(tmp_path / "nope"), "--images", str(tmp_path),
                       "--output", str(out)]) == 2
  assert "nope" in capsys.readouterr().err
  assert predict.main(["--workdir", str(workdir), "--images", str(tmp_path / "missing"),
                       "--output", str(out)]) == 2
