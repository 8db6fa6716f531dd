"""predict: image reading, corrupt-file handling, and the end-to-end submission."""

import csv
import io
import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from nerveseg_jax import imageio


def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def test_reads_any_format_size_and_channels(tmp_path, shared_data):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
  for fmt, suffix in (("TIFF", ".tif"), ("PNG", ".png")):
    (tmp_path / f"g{suffix}").write_bytes(_encode(gray, fmt))
    np.testing.assert_array_equal(imageio.read_gray(tmp_path / f"g{suffix}"), gray)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  (tmp_path / "rgb.png").write_bytes(_encode(rgb, "PNG"))
  np.testing.assert_array_equal(imageio.read_gray(tmp_path / "rgb.png"), gray)
  wide = (gray.astype(np.uint16) * 257)                  # 16-bit scan keeps its contrast
  (tmp_path / "w16.png").write_bytes(_encode(wide, "PNG"))
  np.testing.assert_array_equal(imageio.read_gray(tmp_path / "w16.png"), gray)
  kaggle = imageio.read_gray(shared_data / "kaggle_originals" / "1_1.tif")
  assert kaggle.shape == (420, 580) and kaggle.dtype == np.uint8
  jpg = imageio.read_gray(shared_data / "nerve_real_subset" / "images" / "1_1.jpg")
  assert jpg.shape == (256, 256)
  mask = imageio.read_mask(shared_data / "kaggle_originals" / "1_1_mask.tif")
  assert set(np.unique(mask)) <= {0, 1}


def test_bad_files_name_the_file(tmp_path):
  good = _encode(np.zeros((20, 30), np.uint8), "PNG")
  cases = {"empty.png": b"", "text.png": b"not an image at all",
           "truncated.png": good[:len(good) // 2]}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(imageio.ImageReadError, match=name):
      imageio.read_gray(tmp_path / name)
  with pytest.raises(imageio.ImageReadError, match="missing.tif"):
    imageio.read_gray(tmp_path / "missing.tif")


def test_list_inputs_orders_numbers_and_ignores_masks(tmp_path):
  png = _encode(np.zeros((4, 4), np.uint8), "PNG")
  for name in ("10.tif", "2.tif", "1.tif", "1_mask.tif", "notes.txt"):
    (tmp_path / name).write_bytes(png)
  images, ignored = imageio.list_inputs(tmp_path)
  assert [p.name for p in images] == ["1.tif", "2.tif", "10.tif"]
  assert sorted(p.name for p in ignored) == ["1_mask.tif", "notes.txt"]
  assert imageio.list_inputs(tmp_path / "2.tif") == ([tmp_path / "2.tif"], [])
  with pytest.raises(FileNotFoundError, match="nowhere"):
    imageio.list_inputs(tmp_path / "nowhere")


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def calibrated(smoke_run, calibrated_run):
  return smoke_run, calibrated_run


def test_predict_folder_end_to_end(calibrated, tmp_path, capsys):
  from nerveseg_jax import metrics, predict, rle
  root, workdir = calibrated
  images = tmp_path / "images"
  shutil.copytree(root / "raw" / "test", images)
  names = sorted((p.stem for p in images.glob("*.tif")), key=int)
  good = (images / names[0]).with_suffix(".tif").read_bytes()
  (images / "broken.tif").write_bytes(good[:len(good) // 3])        # corrupt
  (images / "notes.txt").write_text("not a frame")                  # ignored
  out = tmp_path / "out"
  rc = predict.main(["--workdir", str(workdir), "--images", str(images), "--output", str(out),
                     "--batch_size", "8"])
  assert rc == 1                                                     # one file failed
  printed = capsys.readouterr()
  assert "broken.tif" in printed.out + printed.err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["files"] == len(names) + 2 and summary["processed"] == len(names)
  assert summary["failed"] == 1 and summary["ignored"] == 1
  assert summary["nerve_found"] + summary["no_nerve_found"] == len(names)
  assert "broken.tif" in summary["failures"][0]["error"]

  with open(out / "submission.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["img", "pixels"]
  assert [r[0] for r in rows[1:]] == names                           # numeric order
  pred = {}
  for img, pixels in rows[1:]:
    mask = rle.decode(pixels)
    np.testing.assert_array_equal(mask * 255, np.asarray(Image.open(out / "masks" / f"{img}.png")))
    assert np.asarray(Image.open(out / "overlays" / f"{img}.png")).shape == (420, 580, 3)
    pred[img] = mask
  assert (out / "report.html").exists()

  # Better than the all-empty submission on the hidden truth of the synthetic test set.
  with open(root / "raw" / "test_truth.csv", newline="") as f:
    truth = {r["img"]: rle.decode(r["pixels"]) for r in csv.DictReader(f)}
  t = np.stack([truth[n] for n in names])
  score = float(np.mean(metrics.dice_per_example(np.stack([pred[n] for n in names]), t)))
  empty = float(np.mean(metrics.dice_per_example(np.zeros_like(t), t)))
  assert 0.0 < empty < 1.0                                           # both kinds of frame
  assert score > empty, (score, empty)


def test_predict_single_file_and_bad_arguments(calibrated, tmp_path, capsys):
  from nerveseg_jax import predict
  root, workdir = calibrated
  frame = imageio.read_gray(root / "raw" / "test" / "1.tif")
  rgb = np.repeat(frame[::2, ::2, None], 3, axis=-1)                 # another size, RGB
  (tmp_path / "scan.png").write_bytes(_encode(rgb, "PNG"))
  out = tmp_path / "out"
  assert predict.main(["--workdir", str(workdir), "--images", str(tmp_path / "scan.png"),
                       "--output", str(out)]) == 0
  assert np.asarray(Image.open(out / "masks" / "scan.png")).shape == (210, 290)
  fresh = tmp_path / "fresh"  # `out` now holds results: predict would refuse it first
  assert predict.main(["--workdir", str(tmp_path / "nope"), "--images", str(tmp_path),
                       "--output", str(fresh)]) == 2
  assert "nope" in capsys.readouterr().err
  assert predict.main(["--workdir", str(workdir), "--images", str(tmp_path / "missing"),
                       "--output", str(fresh)]) == 2
  assert not fresh.exists()


def test_unique_names_never_collide():
  from nerveseg_jax import predict
  paths = [pathlib.Path(n) for n in ("a.tif", "a.png", "a_tif.png", "b.TIF", "b.tif", "c.jpg")]
  names = predict._unique_names(paths)
  # Unique stems keep their name; a taken name gets a counter.
  assert names == ["a_tif_2", "a_png", "a_tif", "b_tif", "b_tif_2", "c"]


def test_per_frame_results_hidden_files_and_calibration_in_summary(calibrated, tmp_path):
  from nerveseg_jax import inference, postprocess, predict, rle
  root, workdir = calibrated
  images = tmp_path / "images"
  images.mkdir()
  with open(root / "raw" / "test_truth.csv", newline="") as f:
    truth = {r["img"]: r["pixels"].strip() for r in csv.DictReader(f)}
  nerve = [n for n, px in truth.items() if px][:2]
  empty = [n for n, px in truth.items() if not px][:2]
  for n in nerve + empty:
    shutil.copy(root / "raw" / "test" / f"{n}.tif", images)
  (images / ".DS_Store").write_bytes(b"\x00\x01")                   # hidden: counted
  out = tmp_path / "out"
  assert predict.main(["--workdir", str(workdir), "--images", str(images),
                       "--output", str(out)]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["files"] == 5 and summary["ignored"] == 1
  assert summary["ignored_files"] == [str(images / ".DS_Store")]
  # predict applied the calibration that evaluate saved in the workdir.
  assert summary["calibration"] == postprocess.load_calibration(workdir).to_dict()
  with open(out / "submission.csv", newline="") as f:
    rows = {r["img"]: r["pixels"] for r in csv.DictReader(f)}
  frames = {fr["name"]: fr for fr in summary["frames"]}
  assert sorted(frames) == sorted(rows) == sorted(nerve + empty, key=int)
  for name, fr in frames.items():
    # Every frame without a nerve is reported as "No nerve found", with an empty mask.
    assert fr["message"] == (inference.NERVE_FOUND if fr["decision"] else inference.NO_NERVE)
    assert (rows[name] == "") == (not fr["decision"])
    assert fr["area"] == int(rle.decode(rows[name]).sum()) and fr["file"].endswith(f"{name}.tif")
  assert summary["nerve_found"] == sum(fr["decision"] for fr in frames.values())
  assert summary["no_nerve_found"] == sum(not fr["decision"] for fr in frames.values())
  assert sum(fr["message"] == "No nerve found" for fr in frames.values()) >= 1
  printed = predict.format_summary(summary)
  assert f"No nerve found  {summary['no_nerve_found']}" in printed


class _FailsOnShape:
  """The real predictor, except that frames of one shape fail in inference (say, OOM)."""

  def __init__(self, predictor, bad_shape):
    self._predictor, self._bad_shape = predictor, bad_shape
    self.batch_size, self.calibration = predictor.batch_size, predictor.calibration

  def describe(self):
    return self._predictor.describe()

  def predict(self, frames, names):
    if any(f.shape == self._bad_shape for f in frames):
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return self._predictor.predict(frames, names)

  def predict_each(self, frames, names):  # the real fallback, over this predict
    from nerveseg_jax import inference  # pylint: disable=g-import-not-at-top
    return inference.Predictor.predict_each(self, frames, names)


def test_a_frame_failing_in_inference_loses_only_itself(calibrated, tmp_path):
  from nerveseg_jax import inference, predict
  root, workdir = calibrated
  images = tmp_path / "images"
  images.mkdir()
  for n in ("1", "2", "3"):
    shutil.copy(root / "raw" / "test" / f"{n}.tif", images)
  frame = imageio.read_gray(root / "raw" / "test" / "4.tif")
  (images / "huge.png").write_bytes(_encode(frame[:300, :400], "PNG"))
  real = inference.Predictor(workdir, batch_size=2)
  summary = predict.predict_path(_FailsOnShape(real, (300, 400)), images, tmp_path / "out")
  assert summary["files"] == 4 and summary["processed"] == 3 and summary["failed"] == 1
  assert summary["failures"][0]["file"].endswith("huge.png")
  assert "huge.png: inference failed" in summary["failures"][0]["error"]
  assert "RESOURCE_EXHAUSTED" in summary["failures"][0]["error"]
  # The frames that shared its batch are still processed, exactly as on their own.
  want = real.predict([imageio.read_gray(images / f"{n}.tif") for n in ("1", "2", "3")],
                      ["1", "2", "3"])
  for r in want:
    got = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{r.name}.png"))
    np.testing.assert_array_equal(got, r.mask * 255)
  assert not (tmp_path / "out" / "masks" / "huge.png").exists()


# ------------------------------------------------------------------ two-stage

_CLASSIFIER_BIAS = -8.0   # a classifier that is sure no frame has a nerve


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
  """A classifier workdir (configs/classifier.py:smoke's InceptionResNetV2) whose head
  says "no nerve" for every frame: zero kernel, bias -8, so presence = sigmoid(-8)."""
  import jax.numpy as jnp
  from flax import nnx
  from nerveseg_jax import checkpoint, models, workdir as workdir_lib
  from nerveseg_jax.configs import classifier
  config = classifier.get_config("smoke")
  workdir = tmp_path_factory.mktemp("classifier") / "workdir"
  workdir.mkdir()
  workdir_lib.write_config(workdir, config)
  model = models.build_model(config.model, rngs=nnx.Rngs(0))
  model.head.kernel.value = jnp.zeros_like(model.head.kernel.value)
  model.head.bias.value = jnp.full_like(model.head.bias.value, _CLASSIFIER_BIAS)
  _, _, params, rest = nnx.split(model, nnx.RngState, nnx.Param, ...)
  saver = checkpoint.TrainCheckpointer(workdir, keep=1)
  saver.save(1, {"params": params.to_pure_dict(), "rest": rest.to_pure_dict()}, {"step": 1})
  saver.close()
  return workdir


def test_classifier_decides_presence_and_the_unet_draws_the_mask(calibrated, classifier_run):
  import dataclasses
  from nerveseg_jax import inference, postprocess
  root, workdir = calibrated
  frames = [imageio.read_gray(root / "raw" / "test" / f"{i}.tif") for i in range(1, 9)]
  # The run's own calibration, with a presence threshold (0.01) that the smoke U-Net's
  # weak presence head (about 0.4 on every frame) passes and the classifier does not.
  cal = dataclasses.replace(postprocess.load_calibration(workdir), presence_threshold=0.01)
  unet = inference.Predictor(workdir, batch_size=2, calibration=cal)
  two_stage = inference.Predictor(workdir, classifier_run, batch_size=2, calibration=cal)
  alone = unet.predict(frames)
  assert any(r.decision for r in alone)          # the U-Net alone finds nerves here
  want = 1.0 / (1.0 + np.exp(-_CLASSIFIER_BIAS))
  gated = two_stage.predict(frames)
  for r in gated:                                 # the classifier says no: "No nerve found"
    assert r.presence == pytest.approx(want, rel=1e-4)
    assert not r.decision and r.message == inference.NO_NERVE and r.mask.sum() == 0
  # The mask probabilities are the U-Net's, untouched by the classifier ...
  by_unet = sorted(unet.probabilities(frames), key=lambda t: t[0])
  by_two = sorted(two_stage.probabilities(frames), key=lambda t: t[0])
  for (_, p1, q1), (_, p2, q2) in zip(by_unet, by_two):
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    assert q2 == pytest.approx(want, rel=1e-4)
  # ... so once its presence passes the threshold, the masks are the U-Net's.
  unet.calibration = two_stage.calibration = dataclasses.replace(cal, presence_threshold=0.0)
  pairs = list(zip(unet.predict(frames), two_stage.predict(frames)))
  assert any(b.decision for _, b in pairs)
  for a, b in pairs:
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.decision == b.decision


def test_predict_command_with_a_classifier(calibrated, classifier_run, tmp_path):
  from nerveseg_jax import postprocess, predict
  root, workdir = calibrated
  saved = postprocess.load_calibration(workdir)
  images = tmp_path / "images"
  images.mkdir()
  for n in ("1", "2", "3", "4"):
    shutil.copy(root / "raw" / "test" / f"{n}.tif", images)
  alone = tmp_path / "alone"
  assert predict.main(["--workdir", str(workdir), "--images", str(images),
                       "--output", str(alone)]) == 0
  assert json.loads((alone / "summary.json").read_text())["nerve_found"] >= 1
  out = tmp_path / "out"
  assert predict.main(["--workdir", str(workdir), "--classifier_workdir", str(classifier_run),
                       "--images", str(images), "--output", str(out)]) == 0
  summary = json.loads((out / "summary.json").read_text())
  # The U-Net's mask settings; the presence threshold is the classifier's (the default
  # 0.5: this classifier run was never calibrated), not the U-Net head's.
  assert summary["calibration"] == dict(saved.to_dict(), presence_threshold=0.5)
  assert summary["processed"] == 4 and summary["no_nerve_found"] == 4
  assert str(classifier_run) in summary["pipeline"]
  want = 1.0 / (1.0 + np.exp(-_CLASSIFIER_BIAS))
  for fr in summary["frames"]:
    assert fr["message"] == "No nerve found" and fr["presence"] == pytest.approx(want, abs=2e-6)
  with open(out / "submission.csv", newline="") as f:
    assert [r["pixels"] for r in csv.DictReader(f)] == ["", "", "", ""]


def test_evaluate_calibrates_the_classifier_threshold_and_predict_uses_it(
    calibrated, classifier_run, tmp_path):
  """evaluate --classifier_workdir: the classifier's presence threshold is calibrated on
  the validation fold, saved where Predictor reads it, and predict then applies it."""
  from nerveseg_jax import evaluate, postprocess, predict
  root, calibrated_workdir = calibrated
  workdir, classifier = tmp_path / "unet", tmp_path / "classifier"
  shutil.copytree(calibrated_workdir, workdir)       # the shared fixtures stay as they are
  shutil.copytree(classifier_run, classifier)
  unet_file = (workdir / "calibration.json").read_text()
  assert postprocess.load_calibration(classifier) is None        # starts at the 0.5 default
  assert evaluate.main(["--workdir", str(workdir), "--classifier_workdir",
                        str(classifier)]) == 0
  out = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert out["classifier_workdir"] == str(classifier)
  assert out["pipeline"].startswith("two-stage") and str(classifier) in out["pipeline"]
  before, after = out["before_calibration"], out["metrics"]
  # Before: the classifier (presence sigmoid(-8)) at 0.5 finds no nerve anywhere.
  assert before["confusion"]["true_positive"] + before["confusion"]["false_positive"] == 0
  assert after["kaggle_score"] >= before["kaggle_score"] - 1e-9  # never lowers the score
  # The threshold is written to the classifier's calibration.json; the U-Net's file and
  # so its mask settings are untouched, and the scored settings are that pair's.
  assert (workdir / "calibration.json").read_text() == unet_file
  threshold = postprocess.load_calibration(classifier).presence_threshold
  record = json.loads((classifier / "calibration.json").read_text())["scores"]
  assert record["segmentation_workdir"] == str(workdir)
  np.testing.assert_allclose(record["before"], before["kaggle_score"], atol=1e-6)
  np.testing.assert_allclose(record["after"], after["kaggle_score"], atol=1e-6)
  unet_cal = postprocess.load_calibration(workdir)
  assert out["calibration"] == dict(unet_cal.to_dict(), presence_threshold=threshold)
  if after["kaggle_score"] > before["kaggle_score"] + 1e-9:
    assert threshold < 1.0 / (1.0 + np.exp(-_CLASSIFIER_BIAS))  # lets the U-Net's masks in
    assert after["confusion"]["true_positive"] > 0
  else:
    assert threshold == 0.5                                       # ties keep the old one

  # predict (inference.Predictor, as serve) reads and applies it.
  images = tmp_path / "images"
  images.mkdir()
  for n in ("1", "2"):
    shutil.copy(root / "raw" / "test" / f"{n}.tif", images)
  assert predict.main(["--workdir", str(workdir), "--classifier_workdir", str(classifier),
                       "--images", str(images), "--output", str(tmp_path / "out")]) == 0
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["calibration"] == out["calibration"]

  # --no_calibrate: a fresh Predictor with the saved pair reproduces the calibrated
  # validation score, and changes nothing.
  saved = (classifier / "calibration.json").read_text()
  assert evaluate.main(["--workdir", str(workdir), "--classifier_workdir", str(classifier),
                        "--no_calibrate"]) == 0
  again = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert "before_calibration" not in again and again["calibration"] == out["calibration"]
  np.testing.assert_allclose(again["metrics"]["kaggle_score"], after["kaggle_score"],
                             atol=1e-6)
  assert (classifier / "calibration.json").read_text() == saved
  assert evaluate.main(["--workdir", str(workdir), "--classifier_workdir",
                        str(calibrated_workdir)]) == 2           # not a classifier run
