"""Data: synthetic set, TFDS source, folds, duplicates, preprocessing, augmentation, pipeline."""
