"""nerveseg_jax: brachial plexus segmentation in neck ultrasound with JAX and Flax NNX."""

__version__ = "0.1.0"
