"""XLA:CPU flags measured to be faster on the project's models (docs/performance.md).

With its YNNPACK fusions disabled XLA:CPU runs convolutions through multi-threaded
Eigen: about 2x faster forward and 4x faster forward + backward per 3x3 conv on 2 cores
than the single-threaded YNN kernels it picks by default (jaxlib 0.10). Only the host
backend reads `--xla_cpu_*` flags, so this is harmless on GPU and TPU.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def apply_cpu_xla_flags(environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS unless the user set that flag; returns XLA_FLAGS.

  Takes effect only before JAX creates its backends (XLA reads the flags once), which
  is why the package calls it on import. Set NERVESEG_NO_XLA_FLAGS=1 to opt out.
  """
  flags = environ.get("XLA_FLAGS", "")
  if environ.get("NERVESEG_NO_XLA_FLAGS"):
    return flags
  for flag in CPU_XLA_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  environ["XLA_FLAGS"] = flags
  return flags
