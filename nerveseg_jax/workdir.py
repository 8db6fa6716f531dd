"""What a training workdir records beside its checkpoints, and the one atomic writer.

  WORKDIR/config.json           the config of the checkpoints in WORKDIR/checkpoints
  WORKDIR/config_history.jsonl  earlier configs, with the steps each one trained
  WORKDIR/val_history.jsonl     one line per evaluation during training

config.json changes only once a checkpoint trained under the new config is saved,
so a run that fails before its first save (a bad learning rate that goes non-finite,
a full disk) leaves the workdir describing what it holds. Every record of the project
is written with `write_text_atomic`: a reader sees the old file or the new one, never
half of one. No JAX or Orbax here: readers of a workdir need neither.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import uuid
from collections.abc import Mapping
from typing import Any

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
VAL_HISTORY_FILE = "val_history.jsonl"
CHECKPOINT_DIR = "checkpoints"


class CheckpointMismatchError(ValueError):
  """A config or model does not fit the checkpoint it is asked to use."""


def as_path(path: str | os.PathLike) -> epath.Path:
  """A workdir or checkpoint path: local ones absolute, remote ones (gs://...) kept whole.

  pathlib would collapse 'gs://bucket/run' into 'gs:/bucket/run'; epath keeps the
  scheme and reads and writes through the matching file system, like Orbax and TFDS.
  """
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(pathlib.Path(text).expanduser().absolute())


# ------------------------------------------------------------------ the atomic writer


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes PATH whole or not at all: a kill or a full disk mid-write leaves the old file.

  Local files go to a temporary file of a unique name in the same directory (two
  writers never share one), are flushed to disk, then renamed over PATH; the directory
  is synced so the rename itself survives a power cut. On failure the temporary file
  is removed and the error names PATH.
  """
  target = os.fspath(path)
  if "://" in target:
    # An object store has no rename, but an object appears only once its upload is
    # complete, so a direct write is already whole-or-nothing.
    epath.Path(target).write_text(text)
    return
  directory = os.path.dirname(target) or "."
  tmp = os.path.join(directory, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
  try:
    # os.open with 0o666 honours the umask, as a plain open() would (mkstemp's 0o600
    # would make records unreadable to the other users of a shared workdir).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    # newline="": the text is written as given (a CSV's \r\n stays \r\n everywhere).
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if e.errno is None:
      raise
    # Named after PATH: the temporary name would only confuse the reader of the error.
    raise type(e)(e.errno, e.strerror, target) from e
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
  """Makes a rename in DIRECTORY durable (a no-op where directories cannot be opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return  # e.g. Windows
  try:
    os.fsync(fd)
  except OSError:
    pass  # some file systems refuse fsync on directories; the rename is still atomic
  finally:
    os.close(fd)


def _append_jsonl(path, row: Mapping[str, Any]) -> None:
  """Adds one JSON line to PATH. Rewritten whole (small) rather than appended: object
  stores have no append, and the old lines stay intact if the write fails."""
  old = path.read_text() if path.exists() else ""
  if old and not old.endswith("\n"):
    old += "\n"
  write_text_atomic(path, old + json.dumps(row) + "\n")


def _read_jsonl(path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  rows = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {i}: not JSON ({e})") from None
  return rows


# ------------------------------------------------------------------------- config


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """A (saved) config as dotted keys, `data.augment.scale` -> value; lists stay lists."""
  out: dict[str, Any] = {}

  def visit(prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
      for k, v in value.items():
        visit(f"{prefix}.{k}" if prefix else str(k), v)
    else:
      out[prefix] = value

  visit("", config.to_dict() if hasattr(config, "to_dict") else config)
  return out


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = as_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a training workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  write_text_atomic(as_path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2) + "\n")


def read_config_history(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The configs WORKDIR's checkpoints were trained under before its config.json, oldest
  first: {"from_step": a, "to_step": b, "config": {...}} for the steps a < s <= b."""
  return _read_jsonl(as_path(workdir) / CONFIG_HISTORY_FILE)


def record_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                  resumed_from: int) -> None:
  """Makes config.json CONFIG, once a checkpoint trained under it has been saved.

  A different config.json is moved to config_history.jsonl first, with the steps it
  trained (up to RESUMED_FROM, where this run took over). A config.json that trained
  no step (left by a run that never saved) is simply replaced.
  """
  workdir = as_path(workdir)
  new = config_to_dict(config)
  path = workdir / CONFIG_FILE
  if path.exists():
    old = json.loads(path.read_text())
    if old == new:
      return
    if resumed_from > 0:
      history = read_config_history(workdir)
      first = int(history[-1]["to_step"]) if history else 0
      _append_jsonl(workdir / CONFIG_HISTORY_FILE,
                    {"from_step": first, "to_step": int(resumed_from), "config": old})
  write_config(workdir, config)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The committed checkpoint steps of WORKDIR (half-written `*.orbax-checkpoint-tmp*`
  directories are not steps)."""
  directory = as_path(workdir) / CHECKPOINT_DIR
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
  """Keys whose values differ between two nested dicts (lists and tuples equal)."""
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}.{k}")
    return out
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  return [] if norm(a) == norm(b) else [f"{prefix}: checkpoint {a!r} vs config {b!r}"]


def check_model_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Raises CheckpointMismatchError when WORKDIR holds checkpoints of another train state.

  Compared with the saved WORKDIR/config.json: every `model.*` key, and whether
  gradient clipping is on (`grad_clip_norm` > 0 adds a stage to the optimizer state).
  A workdir without checkpoints (a run that stopped before its first save) is free.
  """
  workdir = as_path(workdir)
  path = workdir / CONFIG_FILE
  if not path.exists() or not checkpoint_steps(workdir):
    return
  saved = json.loads(path.read_text())
  diffs = _diff(saved.get("model", {}), config_to_dict(config).get("model", {}), "model")
  clip = lambda v: bool(v) and float(v) > 0
  if "grad_clip_norm" in saved and clip(saved["grad_clip_norm"]) != clip(
      config.get("grad_clip_norm", 0.0)):
    diffs.append(f"grad_clip_norm: checkpoint {saved['grad_clip_norm']!r} vs config "
                 f"{config.get('grad_clip_norm')!r} (clipping on/off changes the optimizer "
                 "state)")
  if diffs:
    raise CheckpointMismatchError(
        f"{workdir} holds checkpoints of a different model ({path}):\n  "
        + "\n  ".join(diffs) + "\nUse another --workdir, or the saved model config.")


# ---------------------------------------------------------------------- val history


def append_val_history(workdir: str | os.PathLike, step: int,
                       values: Mapping[str, float]) -> None:
  """One JSON line per evaluation in WORKDIR/val_history.jsonl (plain, no TF to read it).

  After a SIGKILL and resume, steps past the restored checkpoint are evaluated again
  and appear twice; readers keep the last line of each step (see read_val_history).
  Non-finite values are written as null (JSON has no NaN).
  """
  row = {"step": int(step), **{k: (float(v) if math.isfinite(float(v)) else None)
                               for k, v in values.items()}}
  _append_jsonl(as_path(workdir) / VAL_HISTORY_FILE, row)


def read_val_history(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """WORKDIR's evaluations, one per step (the last written wins), in step order."""
  by_step = {int(row["step"]): row for row in _read_jsonl(as_path(workdir) / VAL_HISTORY_FILE)}
  return [by_step[k] for k in sorted(by_step)]
