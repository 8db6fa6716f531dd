"""The one predict function: trained runs -> mask probabilities -> calibrated results.

`Predictor` loads one or more segmentation runs (ensembled by averaging probabilities)
and optionally a classifier run, once. A single jitted function does everything on
device for a batch of uint8 frames at their source size (B, H, W, 1): resize to each
run's data.image_size, normalise, run the models in eval mode (optionally with
horizontal-flip test-time augmentation), average the mask and presence probabilities,
and resize the mask probability back to (H, W). jax.jit compiles it once per
(batch size, H, W); frames are grouped by size and the last batch is padded, so a
folder of same-size frames compiles exactly once.

Presence comes from the classifier when one is given, else from the U-Net's presence
head (or, for a U-Net without one, the largest mask probability). The host then applies
the post-processing `Calibration` (postprocess.py). evaluate, predict, serve and
benchmark all go through this module.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nerveseg_jax import postprocess, rle
from nerveseg_jax.postprocess import Calibration
from nerveseg_jax import xla_flags

NO_NERVE = postprocess.NO_NERVE
NERVE_FOUND = postprocess.NERVE_FOUND
CLASSIFIER_MODELS = ("inception_resnet_v2",)


@dataclasses.dataclass
class FramePrediction:
  """The result for one frame, at its source size."""
  name: str
  mask: np.ndarray                 # uint8 (H, W) 0/1; all zero when no nerve was found
  presence: float                  # nerve-presence probability
  decision: bool                   # True: nerve found
  area: int                        # mask pixels
  bbox: tuple[int, int, int, int] | None   # (x0, y0, x1, y1), inclusive-exclusive

  @property
  def message(self) -> str:
    return NERVE_FOUND if self.decision else NO_NERVE

  def rle(self) -> str:
    return rle.encode(self.mask)

  def to_json(self) -> dict[str, Any]:
    """What the API and summaries report for a frame."""
    return dict(name=self.name, height=int(self.mask.shape[0]), width=int(self.mask.shape[1]),
                presence=round(float(self.presence), 6), decision=self.decision,
                message=self.message, area=self.area,
                bbox=list(self.bbox) if self.bbox else None, rle=self.rle())


@dataclasses.dataclass
class _Run:
  workdir: pathlib.Path
  name: str                        # config.model.name
  graphdef: Any
  state: Any
  image_size: tuple[int, int]
  in_channels: int


def _load_run(workdir: str | pathlib.Path, which: str) -> _Run:
  # Imported here so that importing inference (e.g. for tests of post-processing or
  # the web app's module) does not pull in the training stack.
  from nerveseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir).expanduser()
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"--workdir {workdir}: no config.json; is this a training workdir?")
  config, model = checkpoint.load_model(workdir, which=which)
  model.eval()  # BatchNorm running statistics, no dropout
  graphdef, state = nnx.split(model)
  size = tuple(int(s) for s in config.data.image_size)
  if len(size) != 2:
    raise ValueError(f"{workdir}/config.json: data.image_size must be (H, W), got {size}")
  name = str(config.model.name)
  in_channels = int(config.model.get("in_channels", 3 if name in CLASSIFIER_MODELS else 1))
  return _Run(workdir, name, graphdef, state, size, in_channels)


def _prepare(frames: jax.Array, size: tuple[int, int], channels: int) -> jax.Array:
  """uint8 (B, H, W, 1) source frames -> the float input a run was trained on.

  Same order as the training pipeline: resize the uint8 frames to the run's size
  (kept as uint8, as the pipeline caches them), then normalise.
  """
  from nerveseg_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  x = frames
  if tuple(frames.shape[1:3]) != tuple(size):
    x = preprocess.resize(frames.astype(jnp.float32), size)
    x = jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
  x = preprocess.normalize(x).astype(jnp.float32)
  if channels != 1:
    x = jnp.repeat(x, channels, axis=-1)  # gray into every channel of an RGB model
  return x


def _flip(x: jax.Array) -> jax.Array:
  return x[:, :, ::-1]


def _segment(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Mask probability (B, h, w) and presence probability (B,) or None from a U-Net."""
  out = model(x)
  if isinstance(out, (tuple, list)):
    mask_logits, presence_logit = out[0], out[1]
  else:
    mask_logits, presence_logit = out, None
  prob = jax.nn.sigmoid(mask_logits.astype(jnp.float32))[..., 0]
  presence = None if presence_logit is None else jax.nn.sigmoid(
      presence_logit.astype(jnp.float32).reshape(x.shape[0]))
  return prob, presence


def _classify(model: nnx.Module, x: jax.Array) -> jax.Array:
  """Presence probability (B,) from a classifier's (B, num_classes) logits."""
  logits = model(x).astype(jnp.float32)
  if logits.ndim == 2 and logits.shape[-1] > 1:
    return jax.nn.softmax(logits, axis=-1)[:, -1]  # the last class is "nerve"
  return jax.nn.sigmoid(logits.reshape(x.shape[0]))


def _forward(static: tuple, states: tuple, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
  """uint8 (B, H, W, 1) -> (mask probability (B, H, W), presence probability (B,))."""
  seg_specs, cls_spec, tta = static
  seg_states, cls_state = states
  from nerveseg_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  height, width = frames.shape[1:3]
  probs, presences = [], []
  for (graphdef, size, channels), state in zip(seg_specs, seg_states):
    model = nnx.merge(graphdef, state)
    x = _prepare(frames, size, channels)
    prob, presence = _segment(model, x)
    if tta:
      prob_f, presence_f = _segment(model, _flip(x))
      prob = 0.5 * (prob + _flip(prob_f))
      presence = None if presence is None else 0.5 * (presence + presence_f)
    if (height, width) != tuple(size):
      prob = preprocess.resize(prob[..., None], (height, width))[..., 0]
    probs.append(jnp.clip(prob, 0.0, 1.0))
    if presence is not None:
      presences.append(presence)
  mask_prob = jnp.mean(jnp.stack(probs), axis=0)
  if cls_spec is not None:
    graphdef, size, channels = cls_spec
    model = nnx.merge(graphdef, cls_state)
    x = _prepare(frames, size, channels)
    presence = _classify(model, x)
    if tta:
      presence = 0.5 * (presence + _classify(model, _flip(x)))
  elif presences:
    presence = jnp.mean(jnp.stack(presences), axis=0)
  else:
    presence = jnp.max(mask_prob, axis=(1, 2))  # no presence head: most confident pixel
  return mask_prob, presence


class Predictor:
  """Trained runs, loaded once, behind one jitted batched forward.

  Args:
    workdirs: one or more segmentation workdirs; several are ensembled by averaging
      their probabilities.
    classifier_workdir: optional classifier run that decides nerve presence.
    tta: average with the horizontally flipped frame.
    batch_size: frames per device call; the last batch is padded to it.
    which: 'best' or 'latest' checkpoint of each run.
    calibration: post-processing settings; None reads WORKDIR/calibration.json of the
      first workdir, or uses the defaults when the run was never calibrated. With a
      classifier, the presence threshold is then the classifier's (its own
      calibration.json, else 0.5).
  """

  def __init__(self, workdirs: Sequence[str | pathlib.Path] | str | pathlib.Path,
               classifier_workdir: str | pathlib.Path | None = None, *, tta: bool = False,
               batch_size: int = 8, which: str = "best",
               calibration: Calibration | None = None):
    xla_flags.configure()
    if isinstance(workdirs, (str, pathlib.Path)):
      workdirs = [workdirs]
    if not workdirs:
      raise ValueError("--workdir: at least one segmentation workdir is needed")
    if batch_size < 1:
      raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    self.batch_size = int(batch_size)
    self.tta = bool(tta)
    self.workdirs = [pathlib.Path(w).expanduser() for w in workdirs]
    self.classifier_workdir = (pathlib.Path(classifier_workdir).expanduser()
                               if classifier_workdir else None)
    self.runs = [_load_run(w, which) for w in self.workdirs]
    for run in self.runs:
      if run.name in CLASSIFIER_MODELS:
        raise ValueError(f"--workdir {run.workdir}: a classifier run ({run.name}); "
                         "pass it as --classifier_workdir")
    self.classifier = None
    if self.classifier_workdir is not None:
      self.classifier = _load_run(self.classifier_workdir, which)
      if self.classifier.name not in CLASSIFIER_MODELS:
        raise ValueError(f"--classifier_workdir {self.classifier_workdir}: model "
                         f"{self.classifier.name!r} is not a classifier "
                         f"({', '.join(CLASSIFIER_MODELS)})")
    if calibration is None:
      calibration = postprocess.load_calibration(self.workdirs[0])
      if calibration is not None and len(self.workdirs) > 1:
        # Thresholds chosen for one run's probabilities; an ensemble shifts them.
        # Still the best available guess, so use it, but say so.
        log(f"note: {self.workdirs[0] / postprocess.CALIBRATION_FILE} was calibrated for "
            "that run alone, not for this ensemble")
      calibration = calibration or Calibration()
      if self.classifier is not None:
        calibration = self._classifier_presence_threshold(calibration)
    self.calibration = calibration

    # Shard the batch over the local devices when it divides evenly; else one device.
    devices = jax.local_devices()
    n = len(devices) if self.batch_size % len(devices) == 0 else 1
    self.mesh = jax.make_mesh((n,), ("data",), (jax.sharding.AxisType.Auto,),
                              devices=devices[:n])
    self._batch_sharding = NamedSharding(self.mesh, P("data"))
    replicated = NamedSharding(self.mesh, P())
    seg_specs = tuple((r.graphdef, r.image_size, r.in_channels) for r in self.runs)
    cls_spec = (None if self.classifier is None else
                (self.classifier.graphdef, self.classifier.image_size,
                 self.classifier.in_channels))
    self._states = jax.device_put(
        (tuple(r.state for r in self.runs),
         None if self.classifier is None else self.classifier.state), replicated)
    # The one jitted predict function; graphdefs and flags are static, weights are
    # arguments (not baked-in constants), so compiling is fast and shares memory.
    self._jitted = jax.jit(functools.partial(_forward, (seg_specs, cls_spec, self.tta)),
                           out_shardings=(self._batch_sharding, self._batch_sharding))

  def _classifier_presence_threshold(self, calibration: Calibration) -> Calibration:
    """With a classifier, the presence threshold is the classifier's, not the U-Net's.

    The mask settings (threshold, minimum area, largest component) stay those of the
    segmentation run. Its presence threshold was chosen for its own presence head (and
    is often 0, "let the mask area decide"), which would let every frame through the
    classifier; so the threshold is the classifier run's calibrated one when it has
    CLASSIFIER_WORKDIR/calibration.json, else the default 0.5.
    """
    own = postprocess.load_calibration(self.classifier_workdir)
    threshold = (own or Calibration()).presence_threshold
    source = (self.classifier_workdir / postprocess.CALIBRATION_FILE if own
              else "the default")
    log(f"presence decided by the classifier at threshold {threshold} ({source})")
    return dataclasses.replace(calibration, presence_threshold=threshold)

  def describe(self) -> str:
    runs = ", ".join(str(w) for w in self.workdirs)
    cls = f"; classifier {self.classifier_workdir}" if self.classifier_workdir else ""
    return (f"segmentation {runs}{cls}; tta={self.tta}; batch {self.batch_size}; "
            f"calibration {self.calibration.to_dict()}")

  def forward(self, batch_size: int | None = None, source_size: tuple[int, int] = (420, 580)
              ) -> tuple[Callable[[jax.Array], tuple[jax.Array, jax.Array]], jax.Array]:
    """The jitted forward for one batch shape, and a device input of that shape.

    For benchmarks: `fn, x = predictor.forward(32); jax.block_until_ready(fn(x))`.
    """
    b = batch_size or self.batch_size
    devices = len(self.mesh.devices.flat)
    sharding = self._batch_sharding if b % devices == 0 else NamedSharding(self.mesh, P())
    x = jax.device_put(np.zeros((b, *source_size, 1), np.uint8), sharding)
    return functools.partial(self._jitted, self._states), x

  def warmup(self, source_size: tuple[int, int] = (420, 580)) -> None:
    """Compiles the forward for full batches of `source_size` frames."""
    fn, x = self.forward(self.batch_size, source_size)
    jax.block_until_ready(fn(x))

  def probabilities(self, frames: Sequence[np.ndarray]
                    ) -> Iterator[tuple[int, np.ndarray, float]]:
    """Yields (index, mask probability (H, W) float32, presence) for every frame.

    Frames are (H, W) or (H, W, 1) uint8 of any sizes; they are grouped by size so each
    size is one compiled shape, and yielded in input order within each size.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, frame in enumerate(frames):
      frame = np.asarray(frame)
      if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (
          frame.ndim == 3 and frame.shape[-1] != 1):
        raise ValueError(f"frame {i}: expected uint8 (H, W) or (H, W, 1), got "
                         f"{frame.dtype} {frame.shape}")
      groups.setdefault(tuple(frame.shape[:2]), []).append(i)
    for (h, w), indices in groups.items():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        batch = np.zeros((self.batch_size, h, w, 1), np.uint8)  # padded to the compiled shape
        for row, i in enumerate(chunk):
          batch[row] = np.asarray(frames[i]).reshape(h, w, 1)
        mask_prob, presence = self._jitted(self._states,
                                           jax.device_put(batch, self._batch_sharding))
        mask_prob, presence = np.asarray(mask_prob), np.asarray(presence)
        for row, i in enumerate(chunk):
          yield i, mask_prob[row], float(presence[row])

  def predict(self, frames: Sequence[np.ndarray], names: Sequence[str] | None = None
              ) -> list[FramePrediction]:
    """Calibrated results for frames, in input order."""
    names = list(names) if names is not None else [str(i) for i in range(len(frames))]
    if len(names) != len(frames):
      raise ValueError(f"{len(names)} names for {len(frames)} frames")
    out: list[FramePrediction | None] = [None] * len(frames)
    for i, mask_prob, presence in self.probabilities(frames):
      d = postprocess.apply(mask_prob, presence, self.calibration)
      out[i] = FramePrediction(names[i], d.mask, presence, d.decision, d.area, d.bbox)
    return out  # type: ignore[return-value]


def log(message: str) -> None:
  """Progress lines for the faces, on stderr so stdout stays parseable."""
  print(message, file=sys.stderr, flush=True)
