"""Keeps model construction linear in model size when it is traced (jit, eval_shape).

The private-JAX part lives in `compat.linear_tracing`; this decorator applies it to a
Module's __init__. (layers.BatchNorm sidesteps the same probe when a traced step
updates its statistics.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from nerveseg_jax import compat

_F = TypeVar("_F", bound=Callable)


def linear_init(init: _F) -> _F:
  """Decorates a Module.__init__ so that building it runs under compat.linear_tracing()."""

  @functools.wraps(init)
  def wrapped(*args, **kwargs):
    with compat.linear_tracing():
      return init(*args, **kwargs)

  return wrapped  # type: ignore[return-value]
