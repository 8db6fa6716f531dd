"""XLA:CPU flags measured to be faster on the project's models (docs/performance.md).

With its YNNPACK fusions disabled XLA:CPU runs convolutions through multi-threaded
Eigen: about 2x faster forward and 4x faster forward + backward per 3x3 conv on 2 cores
than the single-threaded YNN kernels it picks by default (jaxlib 0.10). Only the host
backend reads `--xla_cpu_*` flags, so this is harmless on GPU and TPU.

XLA reads XLA_FLAGS once, when JAX starts its backends. So importing the package
changes nothing; each face calls `configure()` first thing in its main, and the library
entry points (`train.train_and_evaluate`, `inference.Predictor`) call it too, so a
notebook user gets the flags, or, when JAX has already started, a clear warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping

from nerveseg_jax import compat

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
_warned = False


def apply_cpu_xla_flags(environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS unless the user set that flag; returns XLA_FLAGS.

  Set NERVESEG_NO_XLA_FLAGS=1 to opt out.
  """
  flags = environ.get("XLA_FLAGS", "")
  if environ.get("NERVESEG_NO_XLA_FLAGS"):
    return flags
  for flag in CPU_XLA_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  environ["XLA_FLAGS"] = flags
  return flags


def missing(environ: MutableMapping[str, str] = os.environ) -> list[str]:
  """The package's flags that XLA_FLAGS lacks (none when opted out)."""
  if environ.get("NERVESEG_NO_XLA_FLAGS"):
    return []
  flags = environ.get("XLA_FLAGS", "")
  return [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]


def configure(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Sets the flags if JAX has not started yet; returns whether they are in force.

  Too late (JAX already started without them) warns once: the run is correct, only
  slower on CPU, and the warning says how to get the flags.
  """
  global _warned
  if not compat.backends_started():
    apply_cpu_xla_flags(environ)
    return True
  lacking = missing(environ)
  if lacking and not _warned:
    _warned = True
    warnings.warn(
        f"JAX started before nerveseg_jax could set XLA_FLAGS {' '.join(lacking)}: CPU "
        "convolutions run up to 2-4x slower. Set it in the environment before JAX "
        "starts (or NERVESEG_NO_XLA_FLAGS=1 to silence this).", stacklevel=2)
  return not lacking
