"""U-Net: shapes at odd sizes, parameter counts, bf16, train/eval modes, build_model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nerveseg_jax.configs import unet as unet_config
from nerveseg_jax.models import UNet, build_model


# One jitted call per test: eager NNX runs every op as its own compiled kernel, which
# costs far more compile time on CPU than compiling the whole forward once.
_forward = nnx.jit(lambda model, x: model(x))


def _count(model: nnx.Module, kind=nnx.Param) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, kind)))


def _torch_reference_params(widths: list[int], cin: int = 1) -> int:
  """Parameters of shared/bench/torch_unet_reference.py's UNet, by formula."""
  conv3 = lambda i, o: 9 * i * o + o
  total, c = 0, cin
  for w in widths:
    total += conv3(c, w) + conv3(w, w)
    c = w
  for w in reversed(widths[:-1]):
    total += 4 * c * w + w                      # ConvTranspose2d(c, w, 2, 2)
    total += conv3(2 * w, w) + conv3(w, w)      # merge block on the concat
    c = w
  return total + c + 1                          # 1x1 out conv


def test_plain_unet_matches_torch_reference_parameter_count():
  model = nnx.eval_shape(lambda: UNet(features=32, depth=4, norm="none",
                                      presence_head=False, rngs=nnx.Rngs(0)))
  assert _count(model) == _torch_reference_params([32, 64, 128, 256, 512]) == 7_759_521
  # Nothing but parameters: no batch statistics, no presence head.
  assert _count(model, nnx.BatchStat) == 0


@pytest.mark.parametrize("features,depth", [(4, 2), (8, 3)])
def test_parameter_count_small(features, depth):
  model = nnx.eval_shape(lambda: UNet(features=features, depth=depth, norm="none",
                                      presence_head=False, rngs=nnx.Rngs(0)))
  widths = [features * 2**i for i in range(depth + 1)]
  assert _count(model) == _torch_reference_params(widths)


def _make(**kwargs) -> UNet:
  """A concrete UNet, initialised inside one jit with the rbg PRNG.

  Eager init compiles every random initializer separately (threefry is slow to
  compile on CPU); one jitted init with rbg keys is several times faster.
  """
  return nnx.jit(lambda: UNet(**kwargs, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))()


# One model for the shape, mode and dtype tests: batch norm, dropout, deep supervision.
_KW = dict(features=4, depth=3, dropout=0.5, deep_supervision=True)


@pytest.fixture(scope="module")
def unet() -> UNet:
  return _make(**_KW)


@pytest.mark.parametrize("size", [(96, 96), (100, 140), (420, 580)])
def test_any_size_gives_input_shape(unet, size):
  unet.eval()
  mask, presence, deep = _forward(unet, jnp.ones((1, *size, 1)))
  assert mask.shape == (1, *size, 1) and presence.shape == (1,)
  # depth 3: deep supervision from the two coarser decoder levels, at full size.
  assert len(deep) == 2 and all(d.shape == (1, *size, 1) for d in deep)
  for out in (mask, presence, *deep):
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_residual_group_resize_variant_shapes():
  model = _make(features=4, depth=2, block="residual", norm="group", upsample="resize",
                presence_head=False)
  assert _count(model, nnx.BatchStat) == 0
  mask, presence = _forward(model, jax.random.normal(jax.random.key(0), (2, 36, 52, 1)))
  assert mask.shape == (2, 36, 52, 1) and presence is None


def test_bf16_compute_fp32_params_finite(unet):
  # Same weights, bf16 compute: the dtype is part of the graph, the state is shared.
  model = nnx.eval_shape(lambda: UNet(**_KW, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  nnx.update(model, nnx.state(unet))
  model.eval()
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
  x = jax.random.normal(jax.random.key(1), (2, 48, 64, 1))
  mask, presence, deep = _forward(model, x)
  for out in (mask, presence, *deep):
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  unet.eval()
  ref, _, _ = _forward(unet, x)
  # bf16 has ~3 significant digits; the logits must still agree closely.
  np.testing.assert_allclose(mask, ref, atol=0.1 * float(jnp.abs(ref).max()) + 1e-3)


def test_batch_norm_stats_change_only_in_train_mode(unet):
  x = 3.0 + jax.random.normal(jax.random.key(2), (2, 32, 32, 1))
  before = jax.tree.map(np.asarray, nnx.state(unet, nnx.BatchStat))
  unet.eval()
  _forward(unet, x)
  same = jax.tree.map(np.asarray, nnx.state(unet, nnx.BatchStat))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                   jax.tree.leaves(same)))
  unet.train()
  _forward(unet, x)
  after = jax.tree.map(np.asarray, nnx.state(unet, nnx.BatchStat))
  assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                       jax.tree.leaves(after)))
  unet.eval()


def test_dropout_deterministic_in_eval_stochastic_in_train(unet):
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 1))
  unet.eval()
  m1, p1, _ = _forward(unet, x)
  m2, p2, _ = _forward(unet, x)
  np.testing.assert_array_equal(m1, m2)
  np.testing.assert_array_equal(p1, p2)
  unet.train()
  t1, q1, _ = _forward(unet, x)
  t2, q2, _ = _forward(unet, x)
  unet.eval()
  # Fresh dropout masks on every call in train mode.
  assert not np.allclose(t1, t2) and not np.allclose(q1, q2)


def test_build_model_from_config_and_errors():
  cfg = unet_config.get_config("smoke").model
  model = nnx.eval_shape(lambda: build_model(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  assert isinstance(model, UNet) and model.depth == cfg.depth
  assert len(model.down) == cfg.depth + 1 and model.presence_out is not None
  bad = ml_collections.ConfigDict(dict(cfg.to_dict(), featurs=8))
  with pytest.raises(ValueError, match=r"model\.featurs"):
    build_model(bad, dtype=jnp.float32, rngs=nnx.Rngs(0))
  bad = ml_collections.ConfigDict(dict(cfg.to_dict(), norm="layer"))
  with pytest.raises(ValueError, match=r"model\.norm"):
    build_model(bad, dtype=jnp.float32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.name"):
    build_model(dict(name="vgg"), dtype=jnp.float32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.depth"):
    build_model(dict(name="unet", depth=0), dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fast_transposed_conv_equals_conv_transpose(dtype):
  # The matmul + depth-to-space form must be the very same op as nnx.ConvTranspose.
  from nerveseg_jax.models import unet as unet_lib
  up = unet_lib._Up(6, 5, "transpose", dtype=dtype, param_dtype=jnp.float32,
                    rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 9, 6))
  ref, fast = up.conv(x), up(x)
  assert fast.shape == (2, 14, 18, 5) and fast.dtype == ref.dtype
  # Same op, but XLA may sum the 6 input channels in another order: a few ulps apart.
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)


def test_max_pool_2x2_matches_nnx_and_its_gradient():
  from nerveseg_jax.models import unet as unet_lib
  x = jax.random.normal(jax.random.key(2), (2, 6, 8, 3))
  x = x.at[0, 0, 0, 0].set(5.0).at[0, 1, 1, 0].set(5.0)  # an exact tie in one window
  ref = nnx.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(np.asarray(unet_lib.max_pool_2x2(x)), np.asarray(ref))
  w = jax.random.normal(jax.random.key(3), ref.shape)
  grad = jax.grad(lambda v: (unet_lib.max_pool_2x2(v) * w).sum())(x)
  # The reference: jnp.max over the window, whose gradient also splits ties evenly.
  plain = lambda v: v.reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4))
  want = jax.grad(lambda v: (plain(v) * w).sum())(x)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-6, atol=1e-7)
  assert float(grad[0, 0, 0, 0]) == pytest.approx(float(w[0, 0, 0, 0]) / 2)
  assert int((np.asarray(grad) != 0).sum()) == ref.size + 1  # one grad per window, +1 tie
