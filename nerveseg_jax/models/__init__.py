"""Flax NNX models. Models know nothing of data, training or files."""
