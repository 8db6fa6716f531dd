"""The one predict function: against the model run by hand, ensembles, TTA, padding.

The short synthetic training run these tests share is conftest's `smoke_run`.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerveseg_jax import inference
from nerveseg_jax.postprocess import Calibration

@pytest.fixture(scope="module")
def run_root(smoke_run):
  return smoke_run


def _frames(run_root, n=5):
  from nerveseg_jax import imageio
  paths = sorted((run_root / "raw" / "test").glob("*.tif"))[:n]
  return [imageio.read_gray(p) for p in paths]


def _by_hand(workdir, frames):
  """The model applied directly, without inference.py: resize, normalise, sigmoid, resize."""
  from nerveseg_jax import loading
  from nerveseg_jax.data import preprocess
  config, model = loading.load_model(workdir)
  model.eval()
  x = jnp.asarray(np.stack(frames)[..., None])
  h, w = x.shape[1:3]
  small = preprocess.resize(x.astype(jnp.float32), tuple(config.data.image_size))
  small = jnp.clip(jnp.round(small), 0, 255).astype(jnp.uint8)
  mask_logits, presence_logit = model(preprocess.normalize(small))[:2]
  prob = preprocess.resize(jax.nn.sigmoid(mask_logits), (h, w))[..., 0]
  return np.asarray(prob), np.asarray(jax.nn.sigmoid(presence_logit)).reshape(-1)


def _probs(predictor, frames):
  out = sorted(predictor.probabilities(frames), key=lambda t: t[0])
  return np.stack([p for _, p, _ in out]), np.array([q for _, _, q in out])


def test_predictor_matches_the_model_run_by_hand(run_root):
  workdir = run_root / "workdir"
  frames = _frames(run_root, 3)
  predictor = inference.Predictor([workdir], batch_size=8)   # 3 frames padded to 8
  prob, presence = _probs(predictor, frames)
  want_prob, want_presence = _by_hand(workdir, frames)
  assert prob.shape == (3, 420, 580)
  np.testing.assert_allclose(prob, want_prob, atol=2e-5)
  np.testing.assert_allclose(presence, want_presence, atol=2e-5)


def test_ensemble_of_one_and_of_two_copies_equal_one_run(run_root):
  workdir = run_root / "workdir"
  frames = _frames(run_root, 4)
  one = _probs(inference.Predictor(workdir, batch_size=4), frames)
  ens1 = _probs(inference.Predictor([workdir], batch_size=4), frames)
  ens2 = _probs(inference.Predictor([workdir, workdir], batch_size=4), frames)
  for a, b in ((one, ens1), (one, ens2)):
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_flip_tta_is_the_mean_of_the_two_views(run_root):
  workdir = run_root / "workdir"
  frames = _frames(run_root, 2)
  plain = inference.Predictor(workdir, batch_size=2)
  prob, presence = _probs(plain, frames)
  prob_f, presence_f = _probs(plain, [f[:, ::-1].copy() for f in frames])
  tta_prob, tta_presence = _probs(inference.Predictor(workdir, batch_size=2, tta=True), frames)
  np.testing.assert_allclose(tta_prob, 0.5 * (prob + prob_f[:, :, ::-1]), atol=2e-5)
  np.testing.assert_allclose(tta_presence, 0.5 * (presence + presence_f), atol=2e-5)


def test_frames_of_any_size_and_calibrated_results(run_root):
  workdir = run_root / "workdir"
  big, = _frames(run_root, 1)
  rng = np.random.default_rng(0)
  small = rng.integers(0, 255, (97, 131), dtype=np.uint8)
  predictor = inference.Predictor(workdir, batch_size=2,
                                  calibration=Calibration(0.5, 0.0, 0, True))
  results = predictor.predict([big, small, big[..., None]], ["a", "b", "c"])
  assert [r.name for r in results] == ["a", "b", "c"]
  assert results[0].mask.shape == (420, 580) and results[1].mask.shape == (97, 131)
  np.testing.assert_array_equal(results[0].mask, results[2].mask)
  for r in results:
    assert r.mask.dtype == np.uint8 and 0.0 <= r.presence <= 1.0
    assert r.area == int(r.mask.sum())
    assert (r.message == inference.NO_NERVE) == (not r.decision)
    if r.decision:
      x0, y0, x1, y1 = r.bbox
      assert r.mask[y0:y1, x0:x1].sum() == r.area
    j = r.to_json()
    assert j["rle"] == r.rle() and j["area"] == r.area
  with pytest.raises(ValueError, match="frame 0"):
    predictor.predict([np.zeros((10, 10), np.float32)])


def test_forward_for_benchmarks(run_root):
  predictor = inference.Predictor(run_root / "workdir", batch_size=8)
  fn, x = predictor.forward(8, (420, 580))
  prob, presence = jax.block_until_ready(fn(x))
  assert prob.shape == (8, 420, 580) and presence.shape == (8,)


def test_bad_workdirs_are_named(tmp_path, run_root):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    inference.Predictor(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="batch_size"):
    inference.Predictor(run_root / "workdir", batch_size=0)
  with pytest.raises(ValueError, match="classifier"):
    inference.Predictor(run_root / "workdir", run_root / "workdir")


def test_ensemble_of_two_different_runs_averages_their_probabilities(run_root, tmp_path):
  """Two genuinely different runs (the smoke run at step 150 and at step 75)."""
  import shutil
  workdir = run_root / "workdir"
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) >= 2, steps
  early = tmp_path / "early"
  shutil.copytree(workdir, early)
  for step in steps[1:]:
    shutil.rmtree(early / "checkpoints" / str(step))     # only the first checkpoint left
  frames = _frames(run_root, 3)
  a = _probs(inference.Predictor(workdir, batch_size=4), frames)
  b = _probs(inference.Predictor(early, batch_size=4), frames)
  assert np.abs(a[0] - b[0]).max() > 1e-2                  # the two runs really differ
  ens = _probs(inference.Predictor([workdir, early], batch_size=4), frames)
  np.testing.assert_allclose(ens[0], 0.5 * (a[0] + b[0]), atol=2e-5)
  np.testing.assert_allclose(ens[1], 0.5 * (a[1] + b[1]), atol=2e-5)


def test_a_unet_without_presence_head_takes_the_largest_mask_probability(tmp_path):
  """Presence then comes from the full-size mask on the host, for every frame size."""
  from nerveseg_jax import trainer
  from nerveseg_jax.configs import unet
  config = unet.get_config("smoke")
  config.model.presence_head = False
  trainer.save_untrained(config, tmp_path)
  predictor = inference.Predictor(tmp_path, batch_size=2, which="latest")
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((64, 96), (120, 90), (33, 200))]
  out = list(predictor.probabilities(frames))
  assert [p.shape for _, p, _ in out] == [f.shape for f in frames]
  for _, prob, presence in out:
    assert presence == pytest.approx(float(prob.max()), abs=1e-6) and 0 < presence < 1
