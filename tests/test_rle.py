import csv

import numpy as np
import pytest
from PIL import Image

from nerveseg_jax import rle


def test_roundtrip_every_row_of_real_csv(shared_data):
  path = shared_data / "kaggle_originals" / "train_masks.csv"
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 5635
  nonempty = 0
  for row in rows:
    mask = rle.decode(row["pixels"])
    assert mask.shape == (420, 580)
    assert rle.encode(mask) == row["pixels"].strip(), (row["subject"], row["img"])
    nonempty += bool(mask.any())
  assert nonempty == 2323


def test_decode_matches_real_mask_file(shared_data):
  orig = shared_data / "kaggle_originals"
  truth = (np.asarray(Image.open(orig / "1_1_mask.tif")) > 127).astype(np.uint8)
  with open(orig / "train_masks.csv", newline="") as f:
    row = next(r for r in csv.DictReader(f) if r["subject"] == "1" and r["img"] == "1")
  np.testing.assert_array_equal(rle.decode(row["pixels"]), truth)
  assert rle.encode(truth * 255) == row["pixels"]


def test_column_major_one_indexed():
  mask = np.zeros((420, 580), np.uint8)
  mask[0, 0] = 1       # pixel 1
  mask[1, 0] = 1       # pixel 2 (down the first column)
  mask[0, 1] = 1       # pixel 421 (top of second column)
  assert rle.encode(mask) == "1 2 421 1"
  np.testing.assert_array_equal(rle.decode("1 2 421 1"), mask)


def test_empty_and_small_shapes():
  assert rle.encode(np.zeros((420, 580))) == ""
  assert not rle.decode("").any()
  assert not rle.decode(float("nan")).any()
  m = np.zeros((4, 3), np.uint8)
  m[:, 2] = 1
  assert rle.encode(m[..., None]) == "9 4"
  np.testing.assert_array_equal(rle.decode("9 4", height=4, width=3), m)


def test_random_roundtrip():
  rng = np.random.default_rng(0)
  for _ in range(20):
    m = (rng.random((37, 53)) > 0.7).astype(np.uint8)
    np.testing.assert_array_equal(rle.decode(rle.encode(m), 37, 53), m)


@pytest.mark.parametrize("bad, msg", [
    ("1 2 3", "odd number"),
    ("5 3 6 2", "overlaps"),
    ("10 2 3 1", "overlaps or precedes"),
    ("243599 5", "outside"),
    ("0 4", "outside"),
    ("3 0", "non-positive"),
    ("1 x", "non-integer"),
])
def test_malformed_strings_raise(bad, msg):
  with pytest.raises(rle.RLEError, match=msg):
    rle.decode(bad)
