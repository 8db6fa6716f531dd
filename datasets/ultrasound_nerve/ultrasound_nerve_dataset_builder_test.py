"""TFDS's own builder test harness on dummy_data/ (tiny frames, both configs)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds

from nerveseg_jax.datasets.ultrasound_nerve import ultrasound_nerve_dataset_builder as und


class KaggleConfigTest(tfds.testing.DatasetBuilderTestCase):
  """dummy_data/ is an extracted Kaggle tree: 3 labelled frames, 2 test frames."""
  DATASET_CLASS = und.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["kaggle"]
  SPLITS = {"train": 3, "test": 2}


class FolderConfigTest(tfds.testing.DatasetBuilderTestCase):
  """dummy_data/folder: JPEG RGB, PNG gray, two frame sizes."""
  DATASET_CLASS = und.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["folder"]
  EXAMPLE_DIR = os.path.join(os.path.dirname(und.__file__), "dummy_data", "folder")
  SPLITS = {"train": 3}


if __name__ == "__main__":
  tfds.testing.test_main()
