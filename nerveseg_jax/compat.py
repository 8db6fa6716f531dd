"""The only place that touches private JAX internals.

Each entry says why no public API does the job and which JAX versions it was written
for (checked against 0.10.x). tests/test_compat.py asserts every private name used
here still exists, so a JAX upgrade that moves one fails that test loudly; at run time
each entry degrades to a safe default instead of breaking training.

- `linear_tracing`: skips the per-probe trace walk that makes traced model
  construction quadratic in depth (upstream jax-ml/jax PR #40041; JAX 0.10).
- `auto_detected_process_count`: the cluster environments JAX itself recognises (TPU
  pods, SLURM, Open MPI, k8s); `jax.distributed.initialize()` detects them too, but
  raises where there is none, and has no public "is there one?" query.
- `backends_started`: whether XLA has read its flags already; no public query.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

# The private paths this module relies on, for the test that watches them.
PRIVATE_NAMES = (
    ("jax._src.interpreters.partial_eval", "DynamicJaxprTracer._origin_msg"),
    ("jax._src.clusters", "ClusterEnv._cluster_types"),
    ("jax._src.xla_bridge", "backends_are_initialized"),
)

try:
  from jax._src.interpreters import partial_eval as _pe
except ImportError:  # pragma: no cover - moved: the workaround turns itself off
  _pe = None

_lock = threading.Lock()
_depth = 0
_saved = None


@contextlib.contextmanager
def linear_tracing() -> Iterator[None]:
  """Within this block tracer attribute errors skip their origin walk (re-entrant).

  Every `rngs.params()` draw in a layer's __init__ makes Flax NNX probe
  `getattr(value, "sharding", None)` on a tracer; JAX builds that AttributeError's
  message by walking every equation traced so far, then Flax throws it away. Building
  Inception-ResNetV2 (~490 draws) spent ~35 s of a 4 min CPU start there. Only the
  message's "where did this tracer come from" part is left out; the switch is
  process-wide while it lasts, so a tracer error raised meanwhile on another thread
  also lacks that part.
  """
  global _depth, _saved
  cls = getattr(_pe, "DynamicJaxprTracer", None) if _pe is not None else None
  if cls is None or not hasattr(cls, "_origin_msg"):  # a JAX without the walk
    yield
    return
  with _lock:
    if _depth == 0:
      _saved = cls.__dict__.get("_origin_msg")
      cls._origin_msg = lambda self: ""
    _depth += 1
  try:
    yield
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0:
        if _saved is None:
          del cls._origin_msg
        else:
          cls._origin_msg = _saved


def auto_detected_process_count() -> int:
  """Processes of the cluster JAX recognises around this one (1 when there is none)."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - moved: behave as a single process
    return 1
  for env in getattr(clusters.ClusterEnv, "_cluster_types", ()):
    if env.opt_in_only_method:
      continue
    try:
      if env.is_env_present() and (env.get_process_count() or 1) > 1:
        return int(env.get_process_count())
    except Exception:  # pylint: disable=broad-except
      # A half-configured environment (e.g. a TPU VM without metadata) is one process.
      continue
  return 1


def backends_started() -> bool:
  """True once JAX has created its backends (and so has read XLA_FLAGS for good)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - moved: assume the worst, callers then warn
    return True
  return bool(xla_bridge.backends_are_initialized())
