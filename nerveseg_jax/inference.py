"""The one predict function: trained runs -> mask probabilities -> calibrated results.

`Predictor` loads one or more segmentation runs (ensembled by averaging probabilities)
and optionally a classifier run, once. Frames of any size are resized on the host to
each run's data.image_size (preprocess.resize_host: the training pipeline's resize, in
numpy), so the one jitted function only ever sees fixed shapes: (batch_size, h, w, 1)
uint8 per distinct run size. It normalises, runs the models in eval mode (optionally
with horizontal-flip test-time augmentation) and returns each run's mask probability
at its own size and the presence probability; the host resizes the masks back to
(H, W) and averages them. Every batch is padded to batch_size, so a Predictor compiles
exactly one program (at warmup, or on first use) whatever the frame sizes: a new size
arriving at a server never stalls the requests behind it, nor adds a program to memory.

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

from nerveseg_jax import crossval, models, postprocess, rle
from nerveseg_jax.postprocess import Calibration
from nerveseg_jax import xla_flags

NO_NERVE = postprocess.NO_NERVE
NERVE_FOUND = postprocess.NERVE_FOUND
CLASSIFIER_MODELS = models.CLASSIFIERS


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


def check_run(workdir: str | pathlib.Path, flag: str = "--workdir") -> pathlib.Path:
  """WORKDIR as a path; FileNotFoundError naming FLAG if it holds no trained run (a
  cross-validation folder counts when its folds do)."""
  path = pathlib.Path(workdir).expanduser()
  if crossval.is_cv_dir(path):
    for fold in crossval.fold_workdirs(path):
      check_run(fold, flag)
    return path
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{flag} {path}: no config.json; is this a training workdir?")
  return path


def _load_run(workdir: str | pathlib.Path, which: str, flag: str = "--workdir") -> _Run:
  # Imported here so that importing inference (e.g. for tests of post-processing or
  # the web app's module) does not pull in the training stack.
  from nerveseg_jax import loading  # pylint: disable=g-import-not-at-top
  workdir = check_run(workdir, flag)
  config, model = loading.load_model(workdir, which=which)
  return _run_of(config, model, workdir)


def _run_of(config, model: nnx.Module, workdir: pathlib.Path) -> _Run:
  model.eval()  # BatchNorm running statistics, no dropout
  graphdef, state = nnx.split(model)
  size = tuple(int(s) for s in config.data.image_size)
  if len(size) != 2:
    raise ValueError(f"{workdir}/config.json: data.image_size must be (H, W), got {size}")
  name = str(config.model.name)
  in_channels = int(config.model.get("in_channels", 3 if name in CLASSIFIER_MODELS else 1))
  return _Run(workdir, name, graphdef, state, size, in_channels)


def _resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(H, W) uint8 -> (h, w) uint8 at a run's size, as the training pipeline caches it."""
  from nerveseg_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  if frame.shape == tuple(size):
    return frame
  return np.clip(np.round(preprocess.resize_host(frame, size)), 0, 255).astype(np.uint8)


def _resize_prob(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A run's (h, w) mask probability back to the frame's (H, W), in [0, 1]."""
  from nerveseg_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  if prob.shape == tuple(size):
    return np.clip(prob, 0.0, 1.0)
  resized = preprocess.resize_host(prob, size)
  return np.clip(resized, 0.0, 1.0, out=resized)  # in place: large frames, one copy


def _prepare(frames: jax.Array, channels: int) -> jax.Array:
  """uint8 (B, h, w, 1) frames at a run's size -> the float input it was trained on."""
  from nerveseg_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  x = preprocess.normalize(frames).astype(jnp.float32)
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


def _forward(static: tuple, states: tuple, inputs: tuple[jax.Array, ...]
             ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Fixed-size uint8 inputs -> (each run's mask probability (B, h, w), presence (B,)).

  inputs[k] is the batch at the k-th distinct model size; each spec names its input.
  Presence is the mean of the presence heads, or the classifier's; for U-Nets without
  a presence head it is left to the host (zeros here), which takes the largest pixel
  of the full-size mask.
  """
  seg_specs, cls_spec, tta = static
  seg_states, cls_state = states
  probs, presences = [], []
  for (graphdef, index, channels), state in zip(seg_specs, seg_states):
    model = nnx.merge(graphdef, state)
    x = _prepare(inputs[index], channels)
    prob, presence = _segment(model, x)
    if tta:
      prob_f, presence_f = _segment(model, _flip(x))
      prob = 0.5 * (prob + _flip(prob_f))
      presence = None if presence is None else 0.5 * (presence + presence_f)
    probs.append(prob)
    if presence is not None:
      presences.append(presence)
  batch = inputs[0].shape[0]
  if cls_spec is not None:
    graphdef, index, channels = cls_spec
    model = nnx.merge(graphdef, cls_state)
    x = _prepare(inputs[index], channels)
    presence = _classify(model, x)
    if tta:
      presence = 0.5 * (presence + _classify(model, _flip(x)))
  elif presences:
    presence = jnp.mean(jnp.stack(presences), axis=0)
  else:
    presence = jnp.zeros((batch,), jnp.float32)
  return tuple(probs), presence


class Predictor:
  """Trained runs, loaded once, behind one jitted batched forward.

  Args:
    workdirs: one or more segmentation workdirs; several are ensembled by averaging
      their probabilities. A cross-validation folder (crossval.py) stands for all its
      folds, each at the checkpoint its out-of-fold score was measured on.
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
    given = [pathlib.Path(w).expanduser() for w in workdirs]
    self.cv_dirs = [w for w in given if crossval.is_cv_dir(w)]
    runs = []  # (workdir, checkpoint)
    for w in given:
      if w in self.cv_dirs:
        runs += [(f, crossval.CHECKPOINT) for f in crossval.fold_workdirs(w)]
      else:
        runs.append((w, which))
    self.workdirs = [w for w, _ in runs]
    self.classifier_workdir = (pathlib.Path(classifier_workdir).expanduser()
                               if classifier_workdir else None)
    self.runs = [_load_run(w, c) for w, c in runs]
    self._check_runs()
    self.classifier = None
    if self.classifier_workdir is not None:
      self.classifier = _load_run(self.classifier_workdir, which, "--classifier_workdir")
      if self.classifier.name not in CLASSIFIER_MODELS:
        raise ValueError(f"--classifier_workdir {self.classifier_workdir}: model "
                         f"{self.classifier.name!r} is not a classifier "
                         f"({', '.join(CLASSIFIER_MODELS)})")
    if calibration is None:
      calibration = postprocess.load_calibration(given[0])
      if calibration is not None and given[0] in self.cv_dirs:
        log(f"{len(self.workdirs)} folds of {given[0]} ensembled, with the calibration "
            "chosen on their out-of-fold predictions (each fold alone)")
      elif calibration is not None and len(self.workdirs) > 1:
        # Thresholds chosen for one run's probabilities; an ensemble shifts them.
        # Still the best available guess, so use it, but say so.
        log(f"note: {given[0] / postprocess.CALIBRATION_FILE} was calibrated for "
            "that run alone, not for this ensemble")
      calibration = calibration or Calibration()
      if self.classifier is not None:
        calibration = self._classifier_presence_threshold(calibration)
    self.calibration = calibration
    self._compile_set()

  @classmethod
  def from_model(cls, config, model: nnx.Module, *, tta: bool = False, batch_size: int = 8,
                 calibration: Calibration | None = None) -> "Predictor":
    """A Predictor of a model in memory (its config gives the input size), e.g. the
    benchmark's or a test's freshly built one: no workdir is written or read."""
    self = cls.__new__(cls)
    if batch_size < 1:
      raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    self.batch_size, self.tta = int(batch_size), bool(tta)
    self.workdirs, self.classifier_workdir, self.classifier = [], None, None
    self.cv_dirs = []
    self.runs = [_run_of(config, model, pathlib.Path("<in memory>"))]
    self._check_runs()
    self.calibration = calibration or Calibration()
    self._compile_set()
    return self

  def _check_runs(self) -> None:
    for run in self.runs:
      if run.name in CLASSIFIER_MODELS:
        raise ValueError(f"--workdir {run.workdir}: a classifier run ({run.name}); "
                         "pass it as --classifier_workdir")

  def _compile_set(self) -> None:
    """The device state and the one jitted program of these runs."""
    # Shard the batch over the local devices when it divides evenly; else one device.
    devices = jax.local_devices()
    n = len(devices) if self.batch_size % len(devices) == 0 else 1
    self.mesh = jax.make_mesh((n,), ("data",), (jax.sharding.AxisType.Auto,),
                              devices=devices[:n])
    self._batch_sharding = NamedSharding(self.mesh, P("data"))
    replicated = NamedSharding(self.mesh, P())
    # One device input per distinct model size; each model names the one it reads.
    models = [*self.runs, *([self.classifier] if self.classifier else [])]
    self.input_sizes = tuple(dict.fromkeys(r.image_size for r in models))
    seg_specs = tuple((r.graphdef, self.input_sizes.index(r.image_size), r.in_channels)
                      for r in self.runs)
    cls_spec = (None if self.classifier is None else
                (self.classifier.graphdef, self.input_sizes.index(self.classifier.image_size),
                 self.classifier.in_channels))
    # Without a presence head or a classifier, presence is the mask's largest pixel.
    self._presence_on_host = self.classifier is None and not self._has_presence_head()
    self._states = jax.device_put(
        (tuple(r.state for r in self.runs),
         None if self.classifier is None else self.classifier.state), replicated)
    # The one jitted predict function; graphdefs and flags are static, weights are
    # arguments (not baked-in constants), so compiling is fast and shares memory. Its
    # inputs always have the same shapes, so it compiles once.
    self._jitted = jax.jit(functools.partial(_forward, (seg_specs, cls_spec, self.tta)),
                           out_shardings=(self._batch_sharding, self._batch_sharding))

  def _has_presence_head(self) -> bool:
    """Whether any U-Net returns a presence logit, from its abstract output."""
    for run in self.runs:
      x = jax.ShapeDtypeStruct((1, *run.image_size, run.in_channels), jnp.float32)
      out = jax.eval_shape(lambda s, v, g=run.graphdef: nnx.merge(g, s)(v), run.state, x)
      if isinstance(out, (tuple, list)) and len(out) > 1 and out[1] is not None:
        return True   # (mask, presence[, deep]); without a head the second is None
    return False

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

  def compiled_shapes(self) -> list[tuple[int, int, int, int]]:
    """The input shapes of the one jitted program: (batch_size, h, w, 1) per model size."""
    return [(self.batch_size, h, w, 1) for h, w in self.input_sizes]

  def _device_batch(self, frames: Sequence[np.ndarray], batch_size: int) -> tuple:
    """(H, W) uint8 frames of any sizes -> the jitted function's fixed-shape inputs,
    resized on the host and padded with blank frames to batch_size rows."""
    devices = len(self.mesh.devices.flat)
    sharding = (self._batch_sharding if batch_size % devices == 0
                else NamedSharding(self.mesh, P()))
    inputs = []
    for h, w in self.input_sizes:
      batch = np.zeros((batch_size, h, w, 1), np.uint8)
      for row, frame in enumerate(frames):
        batch[row, ..., 0] = _resize_frame(frame, (h, w))
      inputs.append(jax.device_put(batch, sharding))
    return tuple(inputs)

  def _run(self, frames: Sequence[np.ndarray], batch_size: int
           ) -> Iterator[tuple[np.ndarray, float]]:
    """(mask probability (H, W), presence) for up to batch_size (H, W) frames."""
    probs, presence = self._jitted(self._states, self._device_batch(frames, batch_size))
    probs = [np.asarray(p) for p in probs]
    presence = np.asarray(presence)
    for row, frame in enumerate(frames):
      # Each run's mask back to the frame's size, then the ensemble mean, on the host.
      mask_prob = _resize_prob(probs[0][row], frame.shape)
      for p in probs[1:]:
        mask_prob += _resize_prob(p[row], frame.shape)
      if len(probs) > 1:
        mask_prob /= len(probs)
      yield mask_prob, (float(mask_prob.max()) if self._presence_on_host
                        else float(presence[row]))

  def forward(self, batch_size: int | None = None, source_size: tuple[int, int] = (420, 580)
              ) -> tuple[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The whole per-batch path (host resize in, network, host resize back) and an input.

    For benchmarks: `fn, x = predictor.forward(32); fn(x)` returns the mask
    probabilities (B, H, W) and presence (B,) of x, host uint8 (B, H, W, 1). A batch
    size other than the Predictor's compiles a second program.
    """
    b = batch_size or self.batch_size

    def fn(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      frames = [np.asarray(f)[..., 0] for f in x]
      out = list(self._run(frames, b))
      return np.stack([p for p, _ in out]), np.array([q for _, q in out], np.float32)

    return fn, np.zeros((b, *source_size, 1), np.uint8)

  def warmup(self) -> None:
    """Compiles the one program (full batches at the models' sizes) ahead of use."""
    blank = [np.zeros(self.input_sizes[0], np.uint8)]
    jax.block_until_ready(self._jitted(self._states, self._device_batch(blank, self.batch_size)))

  def probabilities(self, frames: Sequence[np.ndarray]
                    ) -> Iterator[tuple[int, np.ndarray, float]]:
    """Yields (index, mask probability (H, W) float32, presence) for every frame.

    Frames are (H, W) or (H, W, 1) uint8 of any sizes, mixed freely within a batch;
    they are yielded in input order.
    """
    for i, frame in enumerate(frames):
      frame = np.asarray(frame)
      if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (
          frame.ndim == 3 and frame.shape[-1] != 1):
        raise ValueError(f"frame {i}: expected uint8 (H, W) or (H, W, 1), got "
                         f"{frame.dtype} {frame.shape}")
    for start in range(0, len(frames), self.batch_size):
      chunk = [np.asarray(f).reshape(np.shape(f)[:2])
               for f in frames[start:start + self.batch_size]]
      for row, (mask_prob, presence) in enumerate(self._run(chunk, self.batch_size)):
        yield start + row, mask_prob, presence

  def predict_each(self, frames: Sequence[np.ndarray], names: Sequence[str]
                   ) -> list[FramePrediction | Exception]:
    """`predict`, where a failure costs only the frames that fail: the batch is tried
    whole, then (say one huge frame ran the device out of memory) each frame alone; a
    frame that still fails gets its exception in place of its result."""
    if len(frames) > 1:
      try:
        return list(self.predict(frames, names))
      except Exception:  # pylint: disable=broad-except
        log("a batch failed in inference; retrying its frames one by one")
    out: list[FramePrediction | Exception] = []
    for frame, name in zip(frames, names):
      try:
        out.append(self.predict([frame], [name])[0])
      except Exception as e:  # pylint: disable=broad-except
        out.append(e)
    return out

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
