"""What a run writes to TensorBoard: the event-file writer, the config as hparams, a
panel of fixed validation frames at every evaluation, and `evaluate`'s metrics.

Everything goes to the run's workdir, so `tensorboard --logdir runs` shows training,
the frames and the evaluations of every run side by side.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import pathlib
import socket
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image
# The tensorboard package's own protos and summary helpers: none of them imports TensorFlow.
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

from nerveseg_jax import imageio, postprocess
from nerveseg_jax import workdir as workdir_lib

log = logging.getLogger(__name__)

_WRITER_IDS = itertools.count()  # one event file per writer, even within a second


class EventWriter:
  """Writes TensorBoard event files with the tensorboard package alone.

  clu's default writer goes through tf.summary and so imports TensorFlow; this one
  writes the same records (each plugin's summary tensor: float32 scalars, PNG images as
  tf.summary.image lays them out, text, the hparams session) with tensorboard's
  protos and record format, so training needs no TensorFlow. Every write is flushed:
  writes come only at log and evaluation steps, and a killed run keeps its curves.

  With enabled=False (processes other than 0) it writes no file and does nothing.
  """

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
    self._records = None
    if not enabled:
      return
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_WRITER_IDS)}.v2")
    self._records = record_writer.RecordWriter(open(logdir / name, "wb"))
    self._write(file_version="brain.Event:2")

  def _write(self, **fields) -> None:
    self._records.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
    self._records.flush()

  def _add(self, step: int, values: list) -> None:
    """values: one-value Summary protos, written as one event."""
    summary = summary_pb2.Summary()
    for one in values:
      summary.value.extend(one.value)
    self._write(step=int(step), summary=summary)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    log.debug("[%d] %s", step, ", ".join(f"{k}={v}" for k, v in sorted(scalars.items())))
    if self._records is None or not scalars:
      return
    self._add(step, [scalar_summary.scalar_pb(k, float(v)) for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Each value one uint8 (H, W, C) image, C in 1, 3, 4."""
    if self._records is None or not images:
      return
    values = []
    for tag, image in images.items():
      image = np.asarray(image, np.uint8)
      png = io.BytesIO()
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, "PNG")
      # tf.summary.image's tensor: [width, height, png...] as strings.
      tensor = tensor_util.make_tensor_proto(
          np.array([str(image.shape[1]).encode(), str(image.shape[0]).encode(),
                    png.getvalue()], dtype=object))
      one = summary_pb2.Summary()
      one.value.add(tag=tag, tensor=tensor, metadata=image_metadata.create_summary_metadata(
          display_name=None, description=None))
      values.append(one)
    self._add(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if self._records is None or not texts:
      return
    self._add(step, [text_summary.text_pb(k, str(v)) for k, v in texts.items()])

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self._records is None:
      return
    self._add(0, [hparams_summary.hparams_pb(dict(hparams))])

  def flush(self) -> None:
    if self._records is not None:
      self._records.flush()

  def close(self) -> None:
    if self._records is not None:
      self._records.close()
      self._records = None

  def __enter__(self) -> "EventWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# Frames in the validation panel: enough to see a trend, few enough to stay cheap.
PANEL_FRAMES = 4
# Panels are upscaled (nearest) to at least this width, so outlines and text are legible.
_PANEL_MIN_WIDTH = 256


def flat_hparams(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
  """The config as dotted keys with scalar values (what the hparams plugin accepts)."""
  # Tuples, lists and None are shown as text rather than dropped.
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in workdir_lib.flat_config(config).items()}


def write_hparams(writer, config: Mapping[str, Any]) -> None:
  """Logs the run's config on TensorBoard's HPARAMS tab."""
  writer.write_hparams(flat_hparams(config))


def panel_rows(ids: np.ndarray, has_nerve: np.ndarray, k: int = PANEL_FRAMES) -> np.ndarray:
  """Row indices of the panel's frames: the same ones at every evaluation and resume.

  Frames are ordered by id (not by array position), then about three quarters are
  taken evenly spaced among frames with a nerve and the rest among frames without,
  so the panel shows both outlines and empty-frame decisions.
  """
  order = sorted(range(len(ids)), key=lambda i: imageio.natural_key(str(ids[i])))
  nerve = [i for i in order if has_nerve[i]]
  empty = [i for i in order if not has_nerve[i]]
  want_empty = min(len(empty), k - min(len(nerve), math.ceil(0.75 * k)))
  want_nerve = min(len(nerve), k - want_empty)

  def spaced(rows: list[int], n: int) -> list[int]:
    return [rows[int(j * len(rows) / n)] for j in range(n)] if n else []

  return np.array(sorted(spaced(nerve, want_nerve) + spaced(empty, want_empty),
                         key=order.index), np.int64)


def panel_image(image: np.ndarray, truth: np.ndarray, prob: np.ndarray,
                presence: float) -> np.ndarray:
  """One frame's panel, left to right: the frame, the ground-truth outline, and the
  prediction (uncalibrated defaults) with its decision, presence and Dice."""
  image = np.asarray(image).reshape(np.shape(image)[:2])
  truth = np.asarray(truth).reshape(image.shape) != 0
  decision = postprocess.apply(np.asarray(prob).reshape(image.shape), presence,
                               postprocess.Calibration())
  dice = float(postprocess.dice_from_counts(np.count_nonzero(decision.mask & truth),
                                            decision.area, np.count_nonzero(truth)))
  scale = max(1, -(-_PANEL_MIN_WIDTH // image.shape[1]))
  up = lambda a: np.repeat(np.repeat(np.asarray(a), scale, 0), scale, 1)
  image, truth, mask = up(image), up(truth), up(decision.mask)
  tiles = [imageio.overlay(image, caption="frame"),
           imageio.overlay(image, truth=truth, caption="ground truth"),
           imageio.overlay(image, mask if decision.decision else None,
                           caption=postprocess.caption(decision.decision, presence, dice))]
  gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
  return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


class ValidationPanel:
  """Writes the panel of fixed validation frames at each evaluation of a segmentation run.

  The frames are chosen on process 0 from its validation rows; every process runs the
  (collective) forward, with results replicated, and process 0's writer writes them.
  """

  def __init__(self, config, parts, val_arrays, mesh, k: int = PANEL_FRAMES):
    import jax  # pylint: disable=g-import-not-at-top
    from nerveseg_jax import inference, sharding  # pylint: disable=g-import-not-at-top
    self._config = config
    self._mesh = mesh
    rows = (panel_rows(val_arrays.id, val_arrays.has_nerve, k)
            if jax.process_index() == 0 else np.zeros(0, np.int64))
    self.arrays = val_arrays.take(rows)

    def forward(state, image, index):
      model = parts.merge(state["params"], state["rest"], None)
      model.eval()
      prob, presence = inference._segment(model, image)  # pylint: disable=protected-access
      return prob, (prob.max(axis=(1, 2)) if presence is None else presence), index

    self._forward = jax.jit(forward, out_shardings=sharding.replicated(mesh))

  def write(self, writer, step: int, state) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    from nerveseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    images: dict[str, np.ndarray] = {}
    for batch in pipeline.eval_batches(self.arrays, int(self._config.eval_batch_size),
                                       self._mesh):
      # Replicated outputs: process 0 reads every row. Its own rows carry their index
      # into self.arrays; padding (and the other processes' empty share) carries -1.
      prob, presence, index = (np.asarray(x) for x in self._forward(
          state, batch["image"], batch["index"]))
      for row, i in enumerate(index):
        if i >= 0 and jax.process_index() == 0:
          name = str(self.arrays.id[i])
          images[f"val_frames/{name}"] = panel_image(
              self.arrays.image[i], self.arrays.mask[i], prob[row], float(presence[row]))
    if images:
      writer.write_images(step, images)


def eval_label(out: Mapping[str, Any]) -> str:
  """The tag prefix of an evaluation: eval/val, eval/test, eval/folder_NAME."""
  source = str(out["source"])
  label = (source.removeprefix("split ") if source.startswith("split ")
           else "folder_" + pathlib.Path(source.removeprefix("folder ")).name)
  return f"eval/{label}" + ("_with_classifier" if out.get("classifier_workdir") else "")


def evaluation_scalars(out: Mapping[str, Any]) -> dict[str, float]:
  """evaluate.run's metrics as TensorBoard scalars (undefined ratios left out)."""
  prefix = eval_label(out)
  scalars: dict[str, float] = {}
  for column, metrics in (("", out["metrics"]),
                          ("before_calibration/", out.get("before_calibration") or {})):
    flat = dict(metrics)
    flat.update(flat.pop("confusion", None) or {})  # true_positive, ... as scalars too
    for key, value in flat.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        scalars[f"{prefix}/{column}{key}"] = float(value)
  return scalars


def write_evaluation(workdir: str | pathlib.Path, out: Mapping[str, Any]) -> None:
  """Writes evaluate's metrics into the run's TensorBoard at the checkpoint's step."""
  with EventWriter(workdir) as writer:
    writer.write_scalars(int(out["checkpoint_step"]), evaluation_scalars(out))
