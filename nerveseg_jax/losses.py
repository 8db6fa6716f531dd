"""Training losses: BCE (or focal) + soft Dice on the mask, BCE on nerve presence.

Everything is computed in float32 whatever the compute dtype of the model, since
bf16 sums over a 128x176 mask lose the small nerve regions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, jax.Array]
_SMOOTH = 1.0  # keeps empty-on-empty at Dice 1 and the gradient finite


def bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean sigmoid binary cross-entropy."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets.astype(jnp.float32)))


def soft_dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """1 - soft Dice per example, averaged over the batch (an empty frame predicted empty is 0)."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  t = targets.astype(jnp.float32)
  axes = tuple(range(1, p.ndim))
  inter = jnp.sum(p * t, axis=axes)
  denom = jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes)
  return jnp.mean(1.0 - (2.0 * inter + _SMOOTH) / (denom + _SMOOTH))


def focal(logits: jax.Array, targets: jax.Array, gamma: float = 2.0) -> jax.Array:
  """Mean sigmoid focal loss: BCE down-weighted by (1 - p_t)^gamma on easy pixels, so the
  few pixels on the nerve's edge carry more of the gradient than the easy background."""
  logits, t = logits.astype(jnp.float32), targets.astype(jnp.float32)
  ce = optax.sigmoid_binary_cross_entropy(logits, t)
  p = jax.nn.sigmoid(logits)
  p_t = p * t + (1.0 - p) * (1.0 - t)
  return jnp.mean((1.0 - p_t) ** gamma * ce)


def _match(mask: jax.Array, like: jax.Array) -> jax.Array:
  """Mask resized to a (lower-resolution) deep-supervision output."""
  if mask.shape == like.shape:
    return mask
  return jax.image.resize(mask, like.shape, "linear")


def _split_outputs(outputs: Any) -> tuple[jax.Array, jax.Array | None, Sequence[jax.Array]]:
  if not isinstance(outputs, (tuple, list)):
    raise TypeError("segmentation outputs must be (mask_logits, presence_logit[, deep])")
  mask_logits, presence = outputs[0], outputs[1] if len(outputs) > 1 else None
  deep = tuple(outputs[2]) if len(outputs) > 2 and outputs[2] is not None else ()
  return mask_logits, presence, deep


def seg_loss(outputs: Any, batch: Batch, loss_cfg: Mapping[str, float]
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted BCE + soft Dice on the mask, BCE on presence, and the deep term.

  Weights: loss_cfg.bce, .dice, .focal (focal loss, gamma 2; 0 = off), .presence,
  .deep (deep = mean of BCE + Dice over the deep-supervision outputs; only used when
  the model returns them).
  """
  mask_logits, presence, deep = _split_outputs(outputs)
  mask = batch["mask"].astype(jnp.float32)
  aux = {"bce": bce(mask_logits, mask), "dice_loss": soft_dice_loss(mask_logits, mask)}
  total = loss_cfg["bce"] * aux["bce"] + loss_cfg["dice"] * aux["dice_loss"]
  if loss_cfg.get("focal", 0.0):
    aux["focal"] = focal(mask_logits, mask)
    total = total + loss_cfg["focal"] * aux["focal"]
  if presence is not None and loss_cfg["presence"]:
    aux["presence_bce"] = bce(presence.reshape(-1), batch["has_nerve"])
    total = total + loss_cfg["presence"] * aux["presence_bce"]
  if deep and loss_cfg.get("deep", 0.0):
    terms = [bce(d, _match(mask, d)) + soft_dice_loss(d, _match(mask, d)) for d in deep]
    aux["deep"] = sum(terms) / len(terms)
    total = total + loss_cfg["deep"] * aux["deep"]
  return total, aux


def presence_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Classifier loss: BCE of the (B, 1) or (B,) logit against has_nerve."""
  loss = bce(logits.reshape(-1), batch["has_nerve"])
  return loss, {"presence_bce": loss}
