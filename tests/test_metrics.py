"""The project's Dice and the clu collections (valid mask, nerve-frame Dice)."""

import jax.numpy as jnp
import numpy as np
import pytest

from nerveseg_jax import metrics


def test_dice_per_example_values():
  pred = np.zeros((4, 4, 4), bool)
  truth = np.zeros((4, 4, 4), bool)
  # 0: both empty -> 1 (Kaggle rule). 1: predicted nerve on an empty frame -> 0.
  pred[1, 0, 0] = True
  # 2: half overlap: |X|=2, |Y|=2, |X&Y|=1 -> 0.5. 3: identical -> 1.
  pred[2, 0, :2] = True
  truth[2, 0, 1:3] = True
  pred[3, 1:3, 1:3] = truth[3, 1:3, 1:3] = True
  np.testing.assert_allclose(metrics.dice_per_example(pred, truth), [1.0, 0.0, 0.5, 1.0])
  # Channel axis and non-bool inputs are accepted.
  np.testing.assert_allclose(
      metrics.dice_per_example(pred[..., None].astype(np.uint8), truth[..., None]),
      [1.0, 0.0, 0.5, 1.0])


def test_dice_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="shape"):
    metrics.dice_per_example(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_eval_collection_respects_valid_and_nerve_masks():
  mask = np.zeros((4, 4, 4, 1), np.float32)
  mask[0, :2] = 1.0                    # nerve frame, predicted right
  mask[1, :2] = 1.0                    # nerve frame, predicted empty -> Dice 0
  logits = np.full((4, 4, 4, 1), -5.0, np.float32)
  logits[0, :2] = 5.0
  logits[3] = 5.0                      # padding row: wrong, but must not count
  batch = {"mask": jnp.asarray(mask), "has_nerve": jnp.array([1.0, 1.0, 0.0, 0.0])}
  presence = jnp.array([3.0, 3.0, -3.0, 3.0])
  per_ex = metrics.seg_outputs(jnp.asarray(logits), presence, batch)
  valid = jnp.array([True, True, True, False])
  m = metrics.EvalMetrics.single_from_model_output(
      valid=valid, valid_nerve=valid & (batch["has_nerve"] > 0.5),
      loss=jnp.ones(4), **per_ex)
  m = m.merge(metrics.EvalMetrics.single_from_model_output(
      valid=jnp.zeros(4, bool), valid_nerve=jnp.zeros(4, bool), loss=jnp.ones(4), **per_ex))
  out = metrics.to_host(m.compute())
  np.testing.assert_allclose(out["kaggle_score"], 2 / 3, rtol=1e-6)   # (1 + 0 + 1) / 3
  np.testing.assert_allclose(out["nerve_dice"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(out["presence_accuracy"], 1.0)
  np.testing.assert_allclose(out["loss"], 1.0)


def test_no_nerve_frames_reports_nan_not_an_error():
  per_ex = {"dice": jnp.ones(2), "dice_gated": jnp.ones(2), "presence_correct": jnp.ones(2),
            "loss": jnp.ones(2)}
  m = metrics.EvalMetrics.single_from_model_output(
      valid=jnp.ones(2, bool), valid_nerve=jnp.zeros(2, bool), **per_ex)
  out = metrics.to_host(m.compute())
  assert np.isnan(out["nerve_dice"]) and out["kaggle_score"] == 1.0


def test_train_collection_averages_over_merges():
  one = lambda v: metrics.TrainMetrics.single_from_model_output(
      loss=jnp.array(v), dice=jnp.array([v, v]), presence_correct=jnp.array([1.0, 0.0]))
  out = metrics.to_host(one(1.0).merge(one(3.0)).compute())
  assert out == {"loss": 2.0, "dice": 2.0, "presence_accuracy": 0.5}
