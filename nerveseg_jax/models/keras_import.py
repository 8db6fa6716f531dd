"""Keras Inception-ResNet-v2 weights -> the NNX `InceptionResNetV2` state.

Two file layouts are read (with h5py; Keras itself is not needed):
  * legacy HDF5, as Keras publishes `inception_resnet_v2_weights_tf_dim_ordering_tf_
    kernels_notop.h5`: root attribute `layer_names`; group `<layer>` with attribute
    `weight_names` (e.g. `conv2d_1/kernel:0`) naming datasets under it. A full-model
    save (`model_weights/` group) is read the same way.
  * Keras 3 `.weights.h5`: `layers/<key>/vars/<i>`, the layer's own name in the `name`
    attribute of `vars`, variables in the layer's weight order.

Layers are matched by Keras name. Keras gives the blocks' projections and conv_7b
explicit names (`block35_1_conv`, ..., `conv_7b`, `conv_7b_bn`); every other conv2d_bn
is auto-named (`conv2d[_N]`, `batch_normalization[_N]`), and N counts up in creation
order, so sorting by N gives the code order of keras.applications, which
`InceptionResNetV2.keras_order()` mirrors. Any top (`predictions`) is ignored: the head
keeps its initial value. For a 1-channel model the first kernel is summed over RGB,
which keeps the response to a gray image copied into R, G and B.
"""

import functools
import pathlib
import re
import zipfile
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nerveseg_jax.models.inception_resnet_v2 import ConvBN, InceptionResNetV2

_AUTO = re.compile(r"^(conv2d|batch_normalization)(?:_(\d+))?$")


class KerasImportError(ValueError):
  """The file is not Keras Inception-ResNet-v2 weights that fit the model."""


def _text(value: Any) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_legacy(root: h5py.Group) -> dict[str, list[np.ndarray]]:
  out = {}
  for name in (_text(n) for n in root.attrs["layer_names"]):
    if name not in root:
      raise KerasImportError(f"layer {name!r} is listed in layer_names but its weights "
                             "are missing (truncated file?)")
    group = root[name]
    names = [_text(w) for w in group.attrs.get("weight_names", [])]
    out[name] = [np.asarray(group[w]) for w in names]
  return out


def _read_keras3(root: h5py.Group) -> dict[str, list[np.ndarray]]:
  out = {}
  for key, group in root["layers"].items():
    if "vars" not in group:
      continue
    variables = group["vars"]
    name = _text(variables.attrs.get("name", key))
    out[name] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
  return out


def read_weights(path: str | pathlib.Path) -> dict[str, list[np.ndarray]]:
  """{Keras layer name: [arrays in the layer's weight order]} from either layout."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Keras weights file {path} does not exist")
  if zipfile.is_zipfile(path):
    raise KerasImportError(
        f"{path}: a zip archive (a whole-model `.keras` file?), not an HDF5 weights file; "
        "extract its model.weights.h5, or save one with model.save_weights('x.weights.h5')")
  try:
    with h5py.File(path, "r") as f:
      root = f["model_weights"] if "model_weights" in f else f
      if "layer_names" in root.attrs:
        return _read_legacy(root)
      if "layers" in root:
        return _read_keras3(root)
  except KerasImportError as e:
    raise KerasImportError(f"{path}: {e}") from e
  except (OSError, KeyError) as e:
    raise KerasImportError(f"{path}: not a readable Keras HDF5 weights file "
                           f"(truncated or another format?): {e}") from e
  raise KerasImportError(f"{path}: HDF5 file without Keras weights (no `layer_names` "
                         "attribute and no `layers` group)")


def _put(path: pathlib.Path, layer: str, what: str, target: nnx.Variable,
         value: np.ndarray, *, sum_rgb: bool = False) -> None:
  want = tuple(target.get_value().shape)
  if sum_rgb and value.ndim == 4 and value.shape[2] == 3 and want[2] == 1:
    value = value.sum(axis=2, keepdims=True)
  if tuple(value.shape) != want:
    raise KerasImportError(f"{path}: layer {layer!r} {what} has shape {tuple(value.shape)}, "
                           f"the model expects {want}")
  target.set_value(np.asarray(value, dtype=target.get_value().dtype))


def _load_conv(path, layer, conv: nnx.Conv, weights, *, sum_rgb=False) -> None:
  expect = 2 if conv.bias is not None else 1
  if len(weights) != expect:
    raise KerasImportError(f"{path}: layer {layer!r} has {len(weights)} weights, a conv "
                           f"here has {expect} ({'kernel, bias' if expect == 2 else 'kernel'})")
  _put(path, layer, "kernel", conv.kernel, weights[0], sum_rgb=sum_rgb)
  if expect == 2:
    _put(path, layer, "bias", conv.bias, weights[1])


def _load_bn(path, layer, bn: nnx.BatchNorm, weights) -> None:
  if len(weights) != 3:
    raise KerasImportError(f"{path}: layer {layer!r} has {len(weights)} weights, expected "
                           "3 (beta, moving_mean, moving_variance of a scale-free BatchNorm)")
  for what, target, value in zip(("beta", "moving_mean", "moving_variance"),
                                 (bn.bias, bn.mean, bn.var), weights):
    _put(path, layer, what, target, value)


def _auto_layers(path, weights, prefix: str, count: int) -> list[str]:
  """The auto-named layers of one kind with weights, in creation order."""
  found = sorted(((int(m.group(2) or 0), name) for name in weights
                  if (m := _AUTO.match(name)) and m.group(1) == prefix and weights[name]))
  names = [name for _, name in found]
  if len(names) != count:
    hint = (f"truncated after {names[-1]!r}, or not Inception-ResNet-v2 weights"
            if names and len(names) < count else "not Inception-ResNet-v2 weights?")
    raise KerasImportError(f"{path}: {len(names)} auto-named {prefix} layers with weights, "
                           f"Inception-ResNet-v2 has {count} ({hint})")
  return names


def _load(model: InceptionResNetV2, path: pathlib.Path,
          weights: dict[str, list[np.ndarray]]) -> nnx.State:
  order = model.keras_order()
  convs = _auto_layers(path, weights, "conv2d", len(order))
  bns = _auto_layers(path, weights, "batch_normalization", len(order))
  for i, (unit, conv_name, bn_name) in enumerate(zip(order, convs, bns)):
    _load_conv(path, conv_name, unit.conv, weights[conv_name], sum_rgb=i == 0)
    _load_bn(path, bn_name, unit.bn, weights[bn_name])
  for name, module in model.keras_named().items():
    if name not in weights:
      raise KerasImportError(f"{path}: layer {name!r} is missing (truncated file, or not "
                             "Inception-ResNet-v2 weights?)")
    if isinstance(module, ConvBN):
      _load_conv(path, name, module.conv, weights[name])
      if name + "_bn" not in weights:
        raise KerasImportError(f"{path}: layer {name + '_bn'!r} is missing")
      _load_bn(path, name + "_bn", module.bn, weights[name + "_bn"])
    else:
      _load_conv(path, name, module, weights[name])
  return nnx.state(model)


@functools.lru_cache(maxsize=4)
def abstract_notop(in_channels: int = 3, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of the no-top model; cached, as tracing it takes seconds."""
  model = nnx.eval_shape(lambda: InceptionResNetV2(
      in_channels=in_channels, include_top=False, dtype=dtype, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def build_from_keras(path: str | pathlib.Path, *, in_channels: int = 3, dtype=jnp.float32
                     ) -> InceptionResNetV2:
  """A no-top InceptionResNetV2 holding the Keras weights of `path` (float32 params).

  Skips the random init (54M values, slow on CPU): the model is built abstractly and
  every array comes from the file. Arrays start as NaN so that anything the file did
  not cover would show up in the outputs rather than pass silently.
  """
  path = pathlib.Path(path).expanduser()
  weights = read_weights(path)  # first: a bad file fails before anything is built
  graphdef, state = abstract_notop(int(in_channels), dtype)
  state = jax.tree.map(lambda a: np.full(a.shape, np.nan, a.dtype), state)
  model = nnx.merge(graphdef, state)
  _load(model, path, weights)
  return model
