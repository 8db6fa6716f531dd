"""nerveseg_jax: brachial plexus segmentation in neck ultrasound with JAX and Flax NNX.

Importing the package changes no environment variable: the faces set the XLA:CPU flags
they need before JAX starts (`xla_flags.configure`).
"""

__version__ = "0.1.0"
