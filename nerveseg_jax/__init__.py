"""nerveseg_jax: brachial plexus segmentation in neck ultrasound with JAX and Flax NNX."""

from nerveseg_jax import xla_flags as _xla_flags

# Before anything of ours imports jax: XLA reads its flags once, when the backend starts.
_xla_flags.apply_cpu_xla_flags()

__version__ = "0.1.0"
