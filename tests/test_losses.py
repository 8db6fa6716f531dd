"""Losses: BCE + soft Dice + presence BCE, focal, their weights and the deep-supervision term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerveseg_jax import losses

CFG = dict(bce=1.0, dice=1.0, presence=0.5, deep=0.0)


def _batch():
  mask = np.zeros((2, 8, 8, 1), np.float32)
  mask[0, 2:5, 2:6] = 1.0
  return {"mask": jnp.asarray(mask), "has_nerve": jnp.array([1.0, 0.0])}


def _logits(mask, scale):
  return (mask * 2 - 1) * scale


def test_perfect_prediction_has_lower_loss_than_inverted():
  b = _batch()
  good = (_logits(b["mask"], 10.0), jnp.array([10.0, -10.0]))
  bad = (_logits(b["mask"], -10.0), jnp.array([-10.0, 10.0]))
  lg, aux_g = losses.seg_loss(good, b, CFG)
  lb, aux_b = losses.seg_loss(bad, b, CFG)
  assert float(lg) < 0.01 < 5.0 < float(lb)
  # Empty frame predicted empty counts as a perfect Dice (soft Dice 1, loss ~0).
  assert float(aux_g["dice_loss"]) < 1e-2
  assert set(aux_g) == {"bce", "dice_loss", "presence_bce"}


def test_weights_are_applied():
  b = _batch()
  out = (jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)))
  _, aux = losses.seg_loss(out, b, CFG)
  total, _ = losses.seg_loss(out, b, dict(bce=2.0, dice=0.0, presence=3.0, deep=0.0))
  np.testing.assert_allclose(total, 2 * aux["bce"] + 3 * aux["presence_bce"], rtol=1e-6)
  np.testing.assert_allclose(aux["bce"], np.log(2), rtol=1e-6)


def test_focal_term_down_weights_easy_pixels_and_is_weighted():
  b = _batch()
  logits = _logits(b["mask"], 3.0)  # confident and right: easy pixels
  # gamma 0 is plain BCE; gamma 2 scales each pixel's BCE by (1 - p_t)^2 < 1.
  np.testing.assert_allclose(losses.focal(logits, b["mask"], gamma=0.0),
                             losses.bce(logits, b["mask"]), rtol=1e-6)
  p_t = jax.nn.sigmoid(3.0)
  np.testing.assert_allclose(losses.focal(logits, b["mask"]),
                             (1 - p_t) ** 2 * losses.bce(logits, b["mask"]), rtol=1e-5)
  out = (logits, jnp.array([9.0, -9.0]))
  off, aux_off = losses.seg_loss(out, b, CFG)
  on, aux = losses.seg_loss(out, b, dict(CFG, focal=4.0))
  assert "focal" not in aux_off
  np.testing.assert_allclose(on - off, 4.0 * aux["focal"], rtol=1e-4, atol=1e-7)


def test_deep_supervision_term_at_lower_resolution():
  b = _batch()
  main = _logits(b["mask"], 10.0)
  deep = (jnp.zeros((2, 4, 4, 1)),)
  with_deep, aux = losses.seg_loss((main, jnp.array([9.0, -9.0]), deep), b,
                                   dict(CFG, deep=0.5))
  without, _ = losses.seg_loss((main, jnp.array([9.0, -9.0]), deep), b, CFG)
  assert "deep" in aux and float(aux["deep"]) > 0.5
  np.testing.assert_allclose(with_deep - without, 0.5 * aux["deep"], rtol=1e-5)


def test_bf16_logits_give_fp32_loss_and_gradients():
  b = _batch()
  f = lambda x: losses.seg_loss((x, jnp.zeros((2,), jnp.bfloat16)), b, CFG)[0]
  x = jnp.zeros((2, 8, 8, 1), jnp.bfloat16)
  assert f(x).dtype == jnp.float32
  assert jnp.all(jnp.isfinite(jax.grad(f)(x).astype(jnp.float32)))


def test_presence_loss_for_classifier():
  b = _batch()
  loss, aux = losses.presence_loss(jnp.array([[5.0], [-5.0]]), b)
  assert float(loss) < 0.01 and "presence_bce" in aux
  with pytest.raises(TypeError, match="mask_logits"):
    losses.seg_loss(jnp.zeros((2, 8, 8, 1)), b, CFG)
