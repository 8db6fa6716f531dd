"""TFDS builders, installed as ``nerveseg_jax.datasets`` (see pyproject.toml)."""
