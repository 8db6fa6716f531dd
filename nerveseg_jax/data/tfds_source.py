"""Prepares the `ultrasound_nerve` TFDS dataset for config.data.source.

  kaggle     data.manual_dir = the Kaggle zip, or a folder holding it or its extracted
             tree; built into data.data_dir ('' = TFDS default).
  folder     data.manual_dir = a folder with images/ and masks/; built into
             <data_dir>/folder/<hash of the folder's absolute path>.
  synthetic  generates the Kaggle-layout tree first (data.synthetic_*), into
             data.manual_dir or <data_dir>/synthetic_raw/<key>, then builds it with the
             kaggle config into <data_dir>/synthetic/<key>.

Staleness: a build records the fingerprint of its source (the builder's
source_fingerprint: names, sizes and mtimes of the files it reads, a zip by size and
content hash). Before a build is used, data.manual_dir is fingerprinted again; if it
differs (frames added, removed or edited, or manual_dir pointed elsewhere) the data are
rebuilt into a temporary folder that then replaces the old build, resized cache
included. Only a kaggle build with data.manual_dir empty (a data_dir staged once for
a cluster) is used as it is; a manual_dir that is set but missing is always an error.
A zip's hash is remembered in <data_dir>/manual/ against its path, size and mtime, so
it is computed once.

Concurrency: generation, the fingerprint check and download_and_prepare run under an
exclusive fcntl lock (<data_dir>/.locks/<name>.lock), so processes started together on
one machine (a local multi-process run) build once and the others wait, then read. The
lock is advisory and local: hosts that share a network file system should prepare
once up front.

Without TFDS: after a synthetic build is checked against its tree, build() leaves a
note beside it (<data_dir>/synthetic/<key>/nerveseg_ready.json: the tree's listing as it
was checked, the build's recorded fingerprint, the builder code's digest). ready_build()
reads that note back without importing TensorFlow or TFDS, so a run whose tree, build and
resized cache already exist (nerveseg_jax.data.arrays) trains on a host without them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, NamedTuple

import ml_collections

log = logging.getLogger(__name__)

KAGGLE_COMMAND = "kaggle competitions download -c ultrasound-nerve-segmentation"
KAGGLE_ZIP = "ultrasound-nerve-segmentation.zip"


class DataNotFoundError(FileNotFoundError):
  """The data a config points at is missing; the message says what to run or set."""


def _missing_kaggle(detail: str) -> DataNotFoundError:
  return DataNotFoundError(
      f"The Kaggle download was not found ({detail}). Download it with\n"
      f"  {KAGGLE_COMMAND}\n"
      f"and set data.manual_dir to {KAGGLE_ZIP} or to the folder holding it or its "
      "extracted train/, test/, train_masks.csv, e.g. "
      f"--config.data.manual_dir=~/{KAGGLE_ZIP}")


def _expand(path: str):
  if "://" in path:  # gs://... staged data: TFDS reads it itself; pathlib would mangle it
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path)
  return pathlib.Path(os.path.expandvars(os.path.expanduser(path))).absolute()


def _data_dir(data_cfg: ml_collections.ConfigDict) -> pathlib.Path:
  if data_cfg.data_dir:
    return _expand(data_cfg.data_dir)
  # TFDS's own default (tensorflow_datasets.core.constants), written out so that
  # ready_build() finds the data without importing TFDS.
  return _expand(os.environ.get("TFDS_DATA_DIR",
                                os.path.join(os.path.expanduser("~"), "tensorflow_datasets")))


def _path_key(path: pathlib.Path) -> str:
  return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(data_dir: pathlib.Path, name: str) -> Iterator[None]:
  if "://" in str(data_dir):  # no flock on object stores: prepare remote data once, up front
    yield
    return
  lock_dir = data_dir / ".locks"
  lock_dir.mkdir(parents=True, exist_ok=True)
  with open(lock_dir / f"{name}.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _kaggle_manual_dir(data_cfg, data_dir: pathlib.Path) -> pathlib.Path:
  if not data_cfg.manual_dir:
    raise _missing_kaggle("data.manual_dir is empty")
  manual = _expand(data_cfg.manual_dir)
  if not manual.exists():
    raise _missing_kaggle(f"data.manual_dir={data_cfg.manual_dir!r} does not exist")
  if manual.is_file():
    if manual.suffix.lower() != ".zip":
      raise DataNotFoundError(f"data.manual_dir={data_cfg.manual_dir!r} is a file but not "
                              "a .zip; give the Kaggle zip or a folder")
    # TFDS wants a folder; give it one holding just this zip under the Kaggle name.
    stage = data_dir / "manual" / _path_key(manual)
    stage.mkdir(parents=True, exist_ok=True)
    link = stage / KAGGLE_ZIP
    if not link.is_symlink() or pathlib.Path(os.readlink(link)) != manual.resolve():
      tmp = stage / f".{KAGGLE_ZIP}.{os.getpid()}"
      tmp.unlink(missing_ok=True)
      tmp.symlink_to(manual.resolve())
      os.replace(tmp, link)
    return stage
  if not any(manual.iterdir()):
    raise _missing_kaggle(f"data.manual_dir={data_cfg.manual_dir!r} is empty")
  return manual


def synthetic_key(data_cfg) -> str:
  """The generated set's name: size, seed and generator version (one folder per set)."""
  from nerveseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return (f"s{data_cfg.synthetic_subjects}_f{data_cfg.synthetic_frames}"
          f"_seed{data_cfg.synthetic_seed}_g{synthetic.GENERATOR_VERSION}")


def raw_tree(data_cfg) -> pathlib.Path | None:
  """The raw Kaggle-layout tree a build reads: data.manual_dir, or for the synthetic
  source the generated tree (which may not exist yet); None when unset."""
  if data_cfg.manual_dir:
    return _expand(data_cfg.manual_dir)
  if data_cfg.source == "synthetic":
    return _data_dir(data_cfg) / "synthetic_raw" / synthetic_key(data_cfg)
  return None


def _synthetic_tree(data_cfg, data_dir: pathlib.Path, key: str) -> pathlib.Path:
  """The generated Kaggle-layout tree, written atomically on first use."""
  from nerveseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  raw = (_expand(data_cfg.manual_dir) if data_cfg.manual_dir
         else data_dir / "synthetic_raw" / key)
  if raw.exists() and any(raw.iterdir()):
    return raw
  raw.parent.mkdir(parents=True, exist_ok=True)
  # Written next to its final place and renamed in one step, so an interrupted run
  # leaves a stray temp folder, never a half tree that looks finished.
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{raw.name}.", dir=raw.parent))
  try:
    synthetic.write_tree(tmp, subjects=data_cfg.synthetic_subjects,
                         frames=data_cfg.synthetic_frames, seed=data_cfg.synthetic_seed)
    if raw.exists():
      raw.rmdir()  # empty (checked above); rename needs it gone or empty
    os.rename(tmp, raw)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return raw


def _zip_sha256(data_dir, und):
  """und.file_sha256, remembered across runs in <data_dir>/manual/ (local data_dir)."""
  if "://" in str(data_dir):
    return und.file_sha256

  def digest(path) -> str:
    if "://" in str(path):
      return und.file_sha256(path)
    real = pathlib.Path(os.path.realpath(path))
    st = real.stat()
    stamp = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = data_dir / "manual" / f"{_path_key(real)}.sha256.json"
    try:
      known = json.loads(memo.read_text())
      if {k: known.get(k) for k in stamp} == stamp:
        return known["sha256"]
    except (OSError, ValueError, KeyError):
      pass
    stamp["sha256"] = und.file_sha256(real)
    from nerveseg_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    try:
      memo.parent.mkdir(parents=True, exist_ok=True)
      workdir_lib.write_text_atomic(memo, json.dumps(stamp))
    except OSError as e:  # a read-only data_dir: hash again next time
      log.warning("could not remember the hash of %s in %s (%s)", real, memo, e)
    return stamp["sha256"]
  return digest


def _download_and_prepare(builder, download_config) -> None:
  """TFDS's build with the project's own two lines: progress bars only on a terminal,
  and TFDS's printed banner kept off stdout unless the log level is DEBUG."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if sys.stderr.isatty():
    tfds.enable_progress_bar()
  else:
    tfds.disable_progress_bar()
  log.info("building the %s data set from %s into %s", builder.builder_config.name,
           download_config.manual_dir, builder.data_dir)
  t = time.perf_counter()
  quiet = not log.isEnabledFor(logging.DEBUG)
  with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
    builder.download_and_prepare(download_config=download_config)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  log.info("built in %.0f s: %s", time.perf_counter() - t,
           ", ".join(f"{k} {n} frames" for k, n in sorted(sizes.items())))


def _prepared(und, config: str, build_dir, manual, data_dir):
  """The builder of manual's data in build_dir, (re)built unless it matches manual."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  want = und.source_fingerprint(config, manual, _zip_sha256(data_dir, und))
  builder = und.Builder(config=config, data_dir=str(build_dir))
  download_config = tfds.download.DownloadConfig(manual_dir=str(manual))
  if not builder.is_prepared():
    _download_and_prepare(builder, download_config)
    return builder
  if und.recorded_fingerprint(builder) == want:
    return builder
  log.warning("%s changed since %s was built from it: rebuilding", manual,
                  builder.data_dir)
  if "://" in str(build_dir):  # no renames on object stores: TFDS deletes, then writes
    download_config.download_mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    _download_and_prepare(builder, download_config)
    return builder
  # Built beside the old data and swapped in by renames, so the old build (and the
  # resized cache inside it) stays whole until the new one is complete.
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".rebuild.", dir=build_dir))
  try:
    fresh = und.Builder(config=config, data_dir=str(tmp))
    _download_and_prepare(fresh, download_config)
    old = pathlib.Path(builder.data_path)
    stale = old.with_name(f".stale.{old.name}{tmp.name}")
    os.rename(old, stale)
    os.rename(pathlib.Path(fresh.data_path), old)
    shutil.rmtree(stale, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return und.Builder(config=config, data_dir=str(build_dir))


def build(data_cfg: ml_collections.ConfigDict):
  """Returns the prepared `ultrasound_nerve` builder for data_cfg.source, rebuilt first
  if its source changed since it was built."""
  from nerveseg_jax.datasets.ultrasound_nerve import ultrasound_nerve_dataset_builder as und  # pylint: disable=g-import-not-at-top

  data_dir = _data_dir(data_cfg)
  source = data_cfg.source
  with _locked(data_dir, f"ultrasound_nerve_{source}"):
    if source == "kaggle":
      config, build_dir = "kaggle", data_dir
      if not data_cfg.manual_dir:
        # A data_dir staged once (e.g. on shared storage for a cluster) needs no
        # download on every host; with no source named there is nothing to compare.
        staged = und.Builder(config=config, data_dir=str(build_dir))
        if staged.is_prepared():
          return staged
      manual = _kaggle_manual_dir(data_cfg, data_dir)
    elif source == "folder":
      if not data_cfg.manual_dir:
        raise DataNotFoundError("data.source='folder' needs data.manual_dir: a folder "
                                "holding images/ and masks/")
      manual = _expand(data_cfg.manual_dir)
      if not manual.is_dir():
        raise DataNotFoundError(f"data.manual_dir={data_cfg.manual_dir!r} is not a folder "
                                "(expected one holding images/ and masks/)")
      config, build_dir = "folder", data_dir / "folder" / _path_key(manual)
    elif source == "synthetic":
      key = synthetic_key(data_cfg)
      manual = _synthetic_tree(data_cfg, data_dir, key)
      build_dir = data_dir / "synthetic" / key
      # Listed before _prepared checks the tree: a tree edited after this point no
      # longer matches the note, so ready_build() sends the next run back here.
      listing = _tree_listing(manual)
      builder = _prepared(und, "kaggle", build_dir, manual, data_dir)
      _note_ready(build_dir, listing, builder, und)
      return builder
    else:
      raise ValueError(f"data.source={source!r}: expected kaggle, folder or synthetic")
    return _prepared(und, config, build_dir, manual, data_dir)


# --------------------------------------------------------- a ready build, without TFDS

_READY_NOTE = "nerveseg_ready.json"
_BUILDER_MODULE = "nerveseg_jax.datasets.ultrasound_nerve.ultrasound_nerve_dataset_builder"
_LISTING_DEPTH = 8  # folders below the tree root; deeper than the builder ever looks


def _tree_listing(root) -> str | None:
  """A digest of every file below root: path, size and modification time (what the
  build's source fingerprint reads of a plain tree, and more: hidden files too).
  None for a tree that cannot be vouched for this way: missing, empty, remote, or
  holding a zip (a zip source is keyed on its content, which a listing does not see)."""
  if "://" in str(root):
    return None
  rows: list[list] = []

  def walk(folder: str, rel: str, depth: int) -> bool:
    with os.scandir(folder) as it:
      entries = sorted(it, key=lambda e: e.name)
    for e in entries:
      if e.is_dir():  # links followed, like the build's own walk
        if depth < _LISTING_DEPTH and not walk(e.path, rel + e.name + "/", depth + 1):
          return False
        continue
      if e.name.lower().endswith(".zip"):
        return False
      st = e.stat()  # follows links: a linked file stands for its target
      rows.append([rel + e.name, st.st_size, st.st_mtime_ns])
    return True

  try:
    if not walk(str(root), "", 0) or not rows:
      return None
  except OSError:
    return None
  return hashlib.sha256(json.dumps([str(root), rows]).encode()).hexdigest()


def _builder_digest() -> str:
  """The builder module's source: another builder (a new VERSION, other parsing) never
  reuses a note taken under the old one. Found without importing it (it imports TFDS)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec(_BUILDER_MODULE)
  if spec is None or not spec.origin:
    raise ImportError(f"{_BUILDER_MODULE} is not installed")
  return hashlib.sha256(pathlib.Path(spec.origin).read_bytes()).hexdigest()


def _note_ready(build_dir, listing: str | None, builder, und) -> None:
  """Records that `builder` was checked against the tree whose listing is `listing`."""
  if listing is None or "://" in str(build_dir):
    return
  try:
    built = pathlib.Path(builder.data_dir).relative_to(build_dir)
  except ValueError:  # not below build_dir: nothing a later run could find
    return
  note = {"listing": listing, "builder": _builder_digest(),
          "source_fingerprint": und.recorded_fingerprint(builder), "data_dir": str(built)}
  path = pathlib.Path(build_dir) / _READY_NOTE
  text = json.dumps(note, indent=1, sort_keys=True)
  try:
    if path.exists() and path.read_text() == text:
      return
    from nerveseg_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    workdir_lib.write_text_atomic(path, text)
  except OSError as e:  # a read-only data_dir: later runs go through TFDS
    log.warning("could not write %s (%s); later runs will check the data through TFDS",
                path, e)


class ReadyBuild(NamedTuple):
  """A build that ready_build() vouched for."""
  data_dir: pathlib.Path    # its TFDS data folder (dataset_info.json, nerveseg_cache/)
  source_fingerprint: str   # what the build recorded (und.recorded_fingerprint)


def ready_build(data_cfg: ml_collections.ConfigDict) -> ReadyBuild | None:
  """The prepared build of a synthetic data_cfg, found without importing TensorFlow or
  TFDS: its TFDS data folder and the source fingerprint it recorded. Only when the note
  build() left matches the tree as it is now (same files, sizes, modification times)
  and the same builder code, i.e. when build() would use the build as it is. None
  otherwise (another source, nothing built yet, anything changed): then build() decides.
  """
  if data_cfg.source != "synthetic":
    return None
  data_dir = _data_dir(data_cfg)
  if "://" in str(data_dir):
    return None
  raw, build_dir = raw_tree(data_cfg), data_dir / "synthetic" / synthetic_key(data_cfg)
  try:
    with _locked(data_dir, "ultrasound_nerve_synthetic"):  # not while build() swaps it
      note = json.loads((build_dir / _READY_NOTE).read_text())
      if note["builder"] != _builder_digest():
        return None
      listing = _tree_listing(raw)
      if listing is None or note["listing"] != listing:
        return None
      built = build_dir / note["data_dir"]
      if not (built / "dataset_info.json").is_file():
        return None
      return ReadyBuild(built, str(note["source_fingerprint"]))
  except (OSError, ImportError, ValueError, KeyError, TypeError):  # no note, or not ours
    return None
