"""Keras weight import: parity with keras.applications, both file layouts, convert_keras.

Keras builds InceptionResNetV2(weights=None) offline with random weights (batch-norm
statistics randomised too, so that they matter); its weights are written in the layout
of Keras's published notop file (`layer/layer/kernel:0`, `weight_names` attributes) and
as a Keras 3 `.weights.h5`. Both run on the same images in inference mode.
"""

import os
import pathlib
import shutil

# TF is the fastest Keras backend to build this model on CPU; any backend gives the
# same weights, so a Keras already imported with another backend is fine too.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nerveseg_jax import loading
from nerveseg_jax import convert_keras
from nerveseg_jax.models import keras_import

SIZE = 107  # 2x2 final feature map: exercises the 'same' paddings that 75 px hides


def _write_legacy_h5(path: pathlib.Path, layers: list[tuple[str, list[tuple[str, np.ndarray]]]]
                     ) -> None:
  """Keras 2's legacy weights layout, as in the notop file Keras publishes."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([name.encode() for name, _ in layers])
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.1.2"
    for name, weights in layers:
      g = f.create_group(name)
      g.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w, _ in weights])
      for w, value in weights:
        g.create_dataset(f"{name}/{w}:0", data=value)


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
  keras = pytest.importorskip("keras")
  tmp = tmp_path_factory.mktemp("keras")
  model = keras.applications.InceptionResNetV2(weights=None, include_top=False,
                                               input_shape=(SIZE, SIZE, 3))
  rng = np.random.default_rng(0)
  layers = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      beta, mean, var = layer.get_weights()
      layer.set_weights([rng.normal(0, 0.1, beta.shape), rng.normal(0, 0.1, mean.shape),
                         rng.uniform(0.5, 1.5, var.shape)])
    if layer.weights:
      layers.append((layer.name, [(w.name, keras.ops.convert_to_numpy(w))
                                  for w in layer.weights]))
  legacy = tmp / "notop.h5"
  _write_legacy_h5(legacy, layers)
  keras3 = tmp / "irv2.weights.h5"
  model.save_weights(keras3)
  x = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  ref = keras.ops.convert_to_numpy(model(x, training=False))
  yield dict(legacy=legacy, keras3=keras3, layers=layers, x=x, ref=ref, tmp=tmp)
  # Two full weight files and their conversions (over 1 GB): not kept in pytest's
  # temp folder, which holds the last three runs.
  shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def legacy_model(keras_files):
  model = keras_import.build_from_keras(keras_files["legacy"])
  model.eval()
  return model


def _leaves(model: nnx.Module) -> list[np.ndarray]:
  return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model))]


def test_parity_with_keras_legacy_h5(keras_files, legacy_model):
  before = _leaves(legacy_model)
  out = nnx.jit(lambda m, x: m(x))(legacy_model, jnp.asarray(keras_files["x"]))
  ref = keras_files["ref"]
  assert out.shape == ref.shape == (2, 2, 2, 1536)
  assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero maps
  np.testing.assert_array_less(np.abs(np.asarray(out) - ref).max(), 1e-4)
  # Inference mode leaves the batch-norm statistics alone.
  assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(legacy_model)))


def test_keras3_weights_h5_gives_same_state(keras_files, legacy_model):
  model = keras_import.build_from_keras(keras_files["keras3"])
  for a, b in zip(_leaves(legacy_model), _leaves(model), strict=True):
    np.testing.assert_array_equal(a, b)


def test_convert_cli_loads_by_key_into_gray_classifier(keras_files, legacy_model, capsys):
  out = keras_files["tmp"] / "ckpt"
  rc = convert_keras.main(["--h5", str(keras_files["legacy"]), "--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  assert "54,336,736 values" in capsys.readouterr().out
  # Converting again into the same directory must not overwrite it.
  assert convert_keras.main(["--h5", str(keras_files["legacy"]), "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
  # What the classifier's init_from expects: the backbone plus a head the file lacks.
  expected = nnx.state(legacy_model).to_pure_dict()
  expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), expected)
  expected["stem"]["conv_1a"]["conv"]["kernel"] = jax.ShapeDtypeStruct((3, 3, 1, 32),
                                                                       jnp.float32)
  expected["head"] = {"kernel": jax.ShapeDtypeStruct((1536, 1), jnp.float32),
                      "bias": jax.ShapeDtypeStruct((1,), jnp.float32)}
  # The RGB stem kernel is summed to the 1 gray channel at load time.
  found = loading.load_init_from(out, expected)  # {'a/0/kernel': array} of keys found
  assert "head/kernel" not in found and "head/bias" not in found
  assert len(found) == len(jax.tree.leaves(expected)) - 2
  rgb = np.asarray(legacy_model.stem.conv_1a.conv.kernel[...])
  np.testing.assert_allclose(found["stem/conv_1a/conv/kernel"],
                             rgb.sum(axis=2, keepdims=True), rtol=1e-6)
  np.testing.assert_array_equal(found["block17/19/up/bias"],
                                np.asarray(legacy_model.block17[19].up.bias[...]))
  np.testing.assert_array_equal(found["conv_7b/bn/var"],
                                np.asarray(legacy_model.conv_7b.bn.var[...]))


def test_truncated_file_is_reported(keras_files, capsys):
  tmp, legacy = keras_files["tmp"], keras_files["legacy"]
  cut = tmp / "cut.h5"
  cut.write_bytes(legacy.read_bytes()[: 1 << 20])
  with pytest.raises(keras_import.KerasImportError, match="cut.h5"):
    keras_import.read_weights(cut)
  assert convert_keras.main(["--h5", str(cut), "--out", str(tmp / "never")]) == 2
  assert "cut.h5" in capsys.readouterr().err and not (tmp / "never").exists()


def test_missing_layers_are_named(keras_files):
  names = [n for n, _ in keras_files["layers"]]
  short = keras_files["tmp"] / "short.h5"
  shutil.copy(keras_files["legacy"], short)
  # A listed layer whose weights are gone.
  with h5py.File(short, "r+") as f:
    del f["block8_10_conv"]
  with pytest.raises(keras_import.KerasImportError, match="block8_10_conv"):
    keras_import.build_from_keras(short)
  # A file that ends before the last block8: its projection is the first thing missing.
  with h5py.File(short, "r+") as f:
    f.attrs["layer_names"] = np.array(
        [n.encode() for n in names[:names.index("block8_10_conv")]])
  with pytest.raises(keras_import.KerasImportError, match="'block8_10_conv' is missing"):
    keras_import.build_from_keras(short)
  # Cut inside the auto-named layers: the error names the last conv that is there.
  half = names[:len(names) // 2]
  last_conv = [n for n in half if n.startswith("conv2d")][-1]
  with h5py.File(short, "r+") as f:
    f.attrs["layer_names"] = np.array([n.encode() for n in half])
  with pytest.raises(keras_import.KerasImportError, match=f"truncated after '{last_conv}'"):
    keras_import.build_from_keras(short)


def test_wrong_shape_is_named(keras_files):
  wrong = keras_files["tmp"] / "wrong.h5"
  shutil.copy(keras_files["legacy"], wrong)
  with h5py.File(wrong, "r+") as f:
    del f["conv_7b/conv_7b/kernel:0"]
    f["conv_7b/conv_7b/kernel:0"] = np.zeros((1, 1, 2080, 1000), np.float32)
  with pytest.raises(keras_import.KerasImportError,
                     match=r"'conv_7b' kernel has shape \(1, 1, 2080, 1000\)"):
    keras_import.build_from_keras(wrong)


def test_gray_import_sums_the_rgb_kernel():
  kernel = nnx.Param(np.zeros((3, 3, 1, 4), np.float32))
  rgb = np.random.default_rng(0).normal(size=(3, 3, 3, 4)).astype(np.float32)
  keras_import._put(pathlib.Path("f.h5"), "conv2d", "kernel", kernel, rgb, sum_rgb=True)
  np.testing.assert_allclose(kernel[...], rgb.sum(axis=2, keepdims=True), rtol=1e-6)
  # Only the first conv is summed; elsewhere a channel mismatch is an error.
  with pytest.raises(keras_import.KerasImportError, match=r"'conv2d_5' kernel"):
    keras_import._put(pathlib.Path("f.h5"), "conv2d_5", "kernel", kernel, rgb)


def test_gray_conversion_cli_sums_the_stem(keras_files, legacy_model, capsys):
  out = keras_files["tmp"] / "gray_ckpt"
  rc = convert_keras.main(["--h5", str(keras_files["legacy"]), "--out", str(out),
                           "--in_channels", "1"])
  assert rc == 0, capsys.readouterr().err
  assert "in_channels=1" in capsys.readouterr().out
  found = loading.load_init_from(out, {"stem": {"conv_1a": {"conv": {
      "kernel": jax.ShapeDtypeStruct((3, 3, 1, 32), jnp.float32)}}}})
  rgb = np.asarray(legacy_model.stem.conv_1a.conv.kernel[...])
  np.testing.assert_allclose(found["stem/conv_1a/conv/kernel"],
                             rgb.sum(axis=2, keepdims=True), rtol=1e-6)


def _convert_fails(tmp_path, h5, capsys) -> str:
  out = tmp_path / "never"
  assert convert_keras.main(["--h5", str(h5), "--out", str(out)]) == 2
  assert not out.exists()
  return capsys.readouterr().err


def test_other_models_and_formats_are_refused(tmp_path, capsys):
  # Another network's weights (a small all-auto-named CNN): the layer count says so.
  other = tmp_path / "resnet_like.h5"
  rng = np.random.default_rng(0)
  _write_legacy_h5(other, [
      ("conv2d", [("kernel", rng.normal(size=(7, 7, 3, 64)).astype(np.float32))]),
      ("batch_normalization", [(w, np.ones(64, np.float32)) for w in
                               ("gamma", "beta", "moving_mean", "moving_variance")]),
      ("conv2d_1", [("kernel", rng.normal(size=(3, 3, 64, 64)).astype(np.float32))]),
  ])
  with pytest.raises(keras_import.KerasImportError,
                     match=r"resnet_like\.h5: 2 auto-named conv2d layers.*has 203"):
    keras_import.build_from_keras(other)
  assert "resnet_like.h5" in _convert_fails(tmp_path, other, capsys)
  # A whole-model .keras archive (a zip) is named as such, with what to do instead.
  archive = tmp_path / "model.keras"
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("config.json", "{}")
  with pytest.raises(keras_import.KerasImportError, match=r"model\.keras: a zip archive"):
    keras_import.read_weights(archive)
  # Not HDF5 at all, and HDF5 without Keras weights.
  text = tmp_path / "notes.h5"
  text.write_text("not weights")
  assert "notes.h5: not a readable Keras HDF5" in _convert_fails(tmp_path, text, capsys)
  empty = tmp_path / "empty.h5"
  with h5py.File(empty, "w") as f:
    f.create_group("something")
  with pytest.raises(keras_import.KerasImportError, match=r"empty\.h5: HDF5 file without"):
    keras_import.read_weights(empty)
  assert "does not exist" in _convert_fails(tmp_path, tmp_path / "absent.h5", capsys)
