"""Sweep files for `python -m nerveseg_jax.sweep --sweep configs/sweeps/<name>.py`."""
