"""The `kaggle` source built from real, untouched Kaggle files (subjects 1 and 2)."""

import csv

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from nerveseg_jax import rle
from nerveseg_jax.configs import common
from nerveseg_jax.data import tfds_source


@pytest.fixture(scope="module")
def real(shared_data):
  path = shared_data / "kaggle_subjects_1_2"
  if not path.exists():
    pytest.skip(f"{path} is not present")
  return path


@pytest.fixture(scope="module")
def built(real, tmp_path_factory):
  cfg = common.data_config()
  cfg.source, cfg.manual_dir = "kaggle", str(real)
  cfg.data_dir = str(tmp_path_factory.mktemp("kaggle_real"))
  b = tfds_source.build(cfg)
  return {split: {ex["id"].decode(): ex for ex in tfds.as_numpy(b.as_dataset(split=split))}
          for split in ("train", "test")}


def test_train_split_matches_files_and_csv(real, built):
  with open(real / "train_masks.csv", newline="") as f:
    rows = {f"{r['subject']}_{r['img']}": r["pixels"] for r in csv.DictReader(f)}
  train = built["train"]
  assert len(train) == len(rows) == 55 and set(train) == set(rows)
  assert sum(not ex["has_nerve"] for ex in train.values()) == 37
  assert sum(not ex["mask"].any() for ex in train.values()) == 37
  for key, ex in train.items():
    assert ex["image"].shape == ex["mask"].shape == (420, 580, 1)
    with Image.open(real / "train" / f"{key}.tif") as im:
      np.testing.assert_array_equal(ex["image"][..., 0], np.asarray(im))
    np.testing.assert_array_equal(ex["mask"][..., 0], rle.decode(rows[key]), err_msg=key)
    assert ex["subject"] == int(key.split("_")[0]) and ex["labeled"]
    assert ex["has_nerve"] == bool(rows[key])


def test_test_split(real, built):
  test = built["test"]
  assert set(test) == {str(n) for n in range(1, 25)}
  for key, ex in test.items():
    with Image.open(real / "test" / f"{key}.tif") as im:
      np.testing.assert_array_equal(ex["image"][..., 0], np.asarray(im))
    assert not ex["labeled"] and not ex["mask"].any()
