"""The project's one Dice, and clu metric collections for training and evaluation.

Kaggle score = mean over frames of Dice(pred, truth), with Dice = 1 when both are
empty. Evaluate, predict and serve use `dice_per_example` from here.
"""


from typing import Any

import flax  # clu collections read the class annotations: no postponed annotations here
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics


def dice_per_example(pred: Any, truth: Any) -> jax.Array:
  """Dice of boolean masks per example: (B, ...) x (B, ...) -> (B,) float32.

  Empty prediction on an empty truth scores 1 (the Kaggle rule); any other case with
  an empty union cannot happen, so no smoothing term distorts small nerves.
  """
  pred = jnp.asarray(pred).astype(bool)
  truth = jnp.asarray(truth).astype(bool)
  if pred.shape != truth.shape:
    raise ValueError(f"dice_per_example: prediction shape {pred.shape} != truth {truth.shape}")
  axes = tuple(range(1, pred.ndim))
  inter = jnp.sum(pred & truth, axis=axes, dtype=jnp.float32)
  total = jnp.sum(pred, axis=axes, dtype=jnp.float32) + jnp.sum(truth, axis=axes,
                                                                dtype=jnp.float32)
  return jnp.where(total == 0, 1.0, 2.0 * inter / jnp.maximum(total, 1.0))


def _average_of(value_key: str, mask_key: str | None = None):
  """An Average over model output `value_key`, masked by output `mask_key` if given."""

  @flax.struct.dataclass
  class _Avg(clu_metrics.Average):

    @classmethod
    def from_model_output(cls, **kwargs) -> clu_metrics.Average:
      mask = kwargs[mask_key] if mask_key else None
      return super().from_model_output(values=kwargs[value_key].astype(jnp.float32),
                                       mask=mask)

    def compute(self) -> Any:
      # 0/0 (e.g. no nerve frame in the validation fold) is reported as NaN, explicitly.
      return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1), jnp.nan)

  _Avg.__name__ = f"Average_{value_key}"
  return _Avg


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: _average_of("loss")
  dice: _average_of("dice")
  presence_accuracy: _average_of("presence_correct")


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  kaggle_score: _average_of("dice", "valid")
  kaggle_score_gated: _average_of("dice_gated", "valid")
  nerve_dice: _average_of("dice", "valid_nerve")
  presence_accuracy: _average_of("presence_correct", "valid")
  loss: _average_of("loss", "valid")


@flax.struct.dataclass
class ClassifierTrainMetrics(clu_metrics.Collection):
  loss: _average_of("loss")
  presence_accuracy: _average_of("presence_correct")


@flax.struct.dataclass
class ClassifierEvalMetrics(clu_metrics.Collection):
  presence_accuracy: _average_of("presence_correct", "valid")
  loss: _average_of("loss", "valid")


def seg_outputs(mask_logits: jax.Array, presence_logit: jax.Array | None,
                batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-example quantities the collections average, at threshold 0.5 (logit 0)."""
  truth = batch["mask"] > 0.5
  pred = mask_logits > 0
  out = {"dice": dice_per_example(pred, truth)}
  has_nerve = batch["has_nerve"] > 0.5
  if presence_logit is not None:
    present = presence_logit.reshape(-1) > 0
    # The presence head gates the mask: the usual way to win on empty frames.
    gated = pred & present[:, None, None, None]
    out["dice_gated"] = dice_per_example(gated, truth)
  else:
    present = jnp.any(pred, axis=tuple(range(1, pred.ndim)))
    out["dice_gated"] = out["dice"]
  out["presence_correct"] = (present == has_nerve).astype(jnp.float32)
  return out


def classifier_outputs(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  present = logits.reshape(-1) > 0
  return {"presence_correct": (present == (batch["has_nerve"] > 0.5)).astype(jnp.float32)}


def to_host(values: dict[str, Any]) -> dict[str, float]:
  """Computed metrics as plain floats (for writers and JSON)."""
  return {k: float(np.asarray(v)) for k, v in values.items()}
