"""Keeps model construction linear in model size when it is traced (jit, eval_shape).

Why: every `rngs.params()` draw in a layer's __init__ assigns the stream's counter, and
Flax NNX's Variable.set_value probes `getattr(value, "sharding", None)` on it. Under a
trace the value is a tracer, whose `.sharding` raises AttributeError with a message that
JAX (0.10) builds eagerly by walking every equation traced so far: the probe is caught
and its message thrown away, but construction becomes quadratic in the number of layers
(upstream: jax-ml/jax PR #40041). For Inception-ResNetV2 (~490 draws) that was ~35 s of
a 4 min CPU training start (cProfile, docs/performance.md). While a model is being
built, that message's "where did this tracer come from" part is left out; the rest of
every error, and all behaviour, is unchanged. The switch is process-wide while it lasts,
so a tracer error raised meanwhile on another thread also lacks that part.
(layers.BatchNorm sidesteps the same probe when a traced step updates its statistics.)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

try:  # private JAX module: if it moves, the workaround turns itself off, nothing breaks
  from jax._src.interpreters import partial_eval as _pe
except ImportError:  # pragma: no cover
  _pe = None

_F = TypeVar("_F", bound=Callable)
_lock = threading.Lock()
_depth = 0
_saved = None


@contextlib.contextmanager
def linear_tracing() -> Iterator[None]:
  """Within this block, tracer attribute errors skip their origin walk (re-entrant)."""
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


def linear_init(init: _F) -> _F:
  """Decorates a Module.__init__ so that building it runs under linear_tracing()."""

  @functools.wraps(init)
  def wrapped(*args, **kwargs):
    with linear_tracing():
      return init(*args, **kwargs)

  return wrapped  # type: ignore[return-value]
