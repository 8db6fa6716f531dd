"""Flax NNX models. Models know nothing of data, training or files."""

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from nerveseg_jax.models.inception_resnet_v2 import InceptionResNetV2
from nerveseg_jax.models import unet
from nerveseg_jax.models.unet import UNet

__all__ = ["UNet", "InceptionResNetV2", "build_model", "MODEL_KEYS", "CLASSIFIERS",
           "is_classifier", "compute_dtype", "abstract_split", "Split"]

def _defaults(cls) -> dict[str, Any]:
  """The keyword defaults of a model's constructor: its config keys, written once."""
  params = inspect.signature(cls.__init__).parameters
  return {k: p.default for k, p in params.items()
          if p.default is not inspect.Parameter.empty and k not in ("dtype", "param_dtype")}


# Config keys each model accepts (besides `name`), with their defaults: the constructors'
# own. The classifier reads gray frames here (its class defaults to RGB, for ImageNet).
MODEL_KEYS: dict[str, dict[str, Any]] = {
    "unet": _defaults(UNet),
    "inception_resnet_v2": {**_defaults(InceptionResNetV2), "in_channels": 1},
}
# Models that answer "is there a nerve?" with one logit, rather than segmenting.
CLASSIFIERS = ("inception_resnet_v2",)
_CHOICES = {"block": unet.BLOCKS, "norm": unet.NORMS, "upsample": unet.UPSAMPLES}


def _as_dict(model_cfg: Any) -> dict[str, Any]:
  if hasattr(model_cfg, "to_dict"):
    return model_cfg.to_dict()
  if isinstance(model_cfg, Mapping):
    return dict(model_cfg)
  raise TypeError(f"model config must be a ConfigDict or mapping, got {type(model_cfg)}")


def build_model(model_cfg: Any, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
  """The model named by model_cfg.name, built from the rest of model_cfg's keys.

  Parameters are float32; `dtype` is the compute dtype (bfloat16 for mixed precision).
  Errors name the offending config key as `model.<key>`.
  """
  cfg = _as_dict(model_cfg)
  name = cfg.pop("name", None)
  if name not in MODEL_KEYS:
    raise ValueError(f"config key model.name={name!r} is not one of {sorted(MODEL_KEYS)}")
  known = MODEL_KEYS[name]
  unknown = sorted(set(cfg) - set(known))
  if unknown:
    raise ValueError(f"unknown config key(s) {', '.join('model.' + k for k in unknown)} "
                     f"for model.name={name!r}; known: {sorted(known)}")
  kwargs = {**known, **cfg}
  for key, choices in _CHOICES.items():
    if key in known and kwargs[key] not in choices:
      raise ValueError(f"config key model.{key}={kwargs[key]!r} is not one of {list(choices)}")
  for key in ("in_channels", "features", "depth", "num_classes"):
    if key in known and (isinstance(kwargs[key], bool) or not isinstance(kwargs[key], int)
                         or kwargs[key] < 1):
      raise ValueError(f"config key model.{key}={kwargs[key]!r} must be a positive integer")
  if not 0.0 <= float(kwargs["dropout"]) < 1.0:
    raise ValueError(f"config key model.dropout={kwargs['dropout']!r} must be in [0, 1)")
  if name == "inception_resnet_v2" and kwargs["in_channels"] not in (1, 3):
    raise ValueError(f"config key model.in_channels={kwargs['in_channels']} must be 1 or 3")
  cls = UNet if name == "unet" else InceptionResNetV2
  return cls(**kwargs, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def is_classifier(model: Any) -> bool:
  """True for a presence classifier; takes a model name, model config or full config."""
  if hasattr(model, "model") and not isinstance(model, str):
    model = model.model
  name = model if isinstance(model, str) else _as_dict(model).get("name")
  return str(name) in CLASSIFIERS


def compute_dtype(config: Any):
  """config.dtype as a jnp dtype (parameters stay float32 whatever it is)."""
  name = str(config.get("dtype", "float32"))
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config key dtype={name!r}: use float32 or bfloat16")
  return jnp.dtype(name)


@dataclasses.dataclass
class Split:
  """An abstract model (no arrays allocated) and its NNX split."""
  model: nnx.Module
  graphdef: Any
  rng: nnx.State
  params: nnx.State
  rest: nnx.State  # everything else: batch statistics


def abstract_split(config: Any, *, seed: int | None = None) -> Split:
  """The model of `config` (model.*, dtype, seed) built abstractly, and split.

  The one way every caller (train state, checkpoints, inference) builds a model's
  layout: traced, so no parameter is computed.
  """
  dtype = compute_dtype(config)
  seed = int(config.get("seed", 0)) if seed is None else seed
  model = nnx.eval_shape(lambda: build_model(config.model, dtype=dtype, rngs=nnx.Rngs(seed)))
  graphdef, rng, params, rest = nnx.split(model, nnx.RngState, nnx.Param, ...)
  return Split(model, graphdef, rng, params, rest)
