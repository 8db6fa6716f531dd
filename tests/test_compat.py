"""compat: the private JAX names it uses still exist, and what each one is for still works."""

import importlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from nerveseg_jax import models
from nerveseg_jax import compat

from jax._src.interpreters import partial_eval as pe  # what compat.linear_tracing patches


@pytest.mark.parametrize("module, attr", compat.PRIVATE_NAMES)
def test_private_names_compat_relies_on_still_exist(module, attr):
  # Fails loudly on the JAX upgrade that moves one: compat.py then needs a look (its
  # run-time fallbacks keep training working, but silently slower or single-process).
  obj = importlib.import_module(module)
  for part in attr.split("."):
    assert hasattr(obj, part), f"JAX {jax.__version__} no longer has {module}.{attr}"
    obj = getattr(obj, part)


def test_backends_started_is_true_once_a_device_is_used():
  jax.devices()
  assert compat.backends_started()


def test_no_cluster_around_a_plain_test_process():
  assert compat.auto_detected_process_count() == 1


@pytest.fixture
def walks(monkeypatch):
  """Counts JaxprStackFrame.find_progenitors calls (the per-probe O(trace) walk)."""
  calls = []
  original = pe.JaxprStackFrame.find_progenitors

  def counted(self, tracer):
    calls.append(1)
    return original(self, tracer)

  monkeypatch.setattr(pe.JaxprStackFrame, "find_progenitors", counted)
  return calls


def _probe_sharding():
  """What flax's Variable.set_value does to every assigned value, under a trace."""
  messages = []

  def f(x):
    y = x * 2
    try:
      y.sharding  # pylint: disable=pointless-statement
    except AttributeError as e:
      messages.append(str(e))
    return y

  jax.jit(f).trace(jnp.ones(3))
  return messages[0]


@pytest.mark.parametrize("name", ["unet", "inception_resnet_v2"])
def test_traced_construction_does_no_origin_walks(name, walks):
  model = nnx.eval_shape(lambda: models.build_model({"name": name}, rngs=nnx.Rngs(0)))
  assert nnx.state(model, nnx.Param)  # it was built
  assert not walks, f"{len(walks)} trace walks while building {name}"


def test_the_workaround_is_scoped_reentrant_and_restored(walks):
  outside = _probe_sharding()
  n = len(walks)
  assert n >= 1  # outside the block JAX's full message (and its walk) are untouched
  with compat.linear_tracing():
    with compat.linear_tracing():
      inside = _probe_sharding()
    inside_after_inner = _probe_sharding()
  assert len(walks) == n  # no walks in either nesting level
  assert "'sharding' attribute is not available" in inside  # still an AttributeError
  assert inside == inside_after_inner
  assert inside == outside  # the probe sees the very same error (Python's fallback text)
  with pytest.raises(RuntimeError):
    with compat.linear_tracing():
      raise RuntimeError("restored on errors too")
  assert _probe_sharding() == outside and len(walks) == 2 * n  # walks again after


def test_an_inherited_origin_msg_is_inherited_again_afterwards(monkeypatch):
  cls = pe.DynamicJaxprTracer
  # As in a JAX where the subclass does not define it (the base Tracer's is used).
  monkeypatch.delattr(cls, "_origin_msg")
  monkeypatch.setattr(pe.core.Tracer, "_origin_msg", lambda self: " base", raising=False)
  with compat.linear_tracing():
    with compat.linear_tracing():
      assert "_origin_msg" in cls.__dict__
  assert "_origin_msg" not in cls.__dict__
