"""Test set-up: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Unless a device count is set already (a subprocess of a test asking for 1 device,
# which imports test helpers and so this file).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
# TensorFlow is host-only here; keep it off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The package's XLA:CPU flags, as every face sets them before JAX starts.
from nerveseg_jax import xla_flags as _xla_flags  # noqa: E402

_xla_flags.configure()

import contextlib
import fcntl
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def import_probe(module: str, watched: tuple[str, ...]) -> str:
  """Python source that runs MODULE as `python -m` would (its argv after the source) and
  prints `IMPORTED {json}`: which of WATCHED it imported, for `python -c SOURCE ARGS`."""
  return f"""
import json, runpy, sys
sys.argv = [{module!r}, *sys.argv[1:]]
try:
  runpy.run_module({module!r}, run_name="__main__")
except SystemExit as e:
  if e.code:
    raise
print("IMPORTED " + json.dumps({{m: m in sys.modules for m in {watched!r}}}))
"""


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  path = SHARED / "data"
  if not path.exists():
    pytest.skip(f"real data folder {path} is not present")
  return path


# The smoke config made just strong enough to find the synthetic nerves (the end-to-end
# test requires beating an all-empty submission on the synthetic test frames); the
# U-Net first learns to predict empty masks (val Dice on nerve frames 0.0 at step 75).
SMOKE_STEPS = 150
# The smoke set's nerves stand out this many times more than real ones: at the real
# frames' contrast, 3 training subjects and 150 steps find no nerve on the test frames.
SMOKE_NERVE_CONTRAST = 3.0


def shared_dir(tmp_path_factory, name: str) -> pathlib.Path:
  """A directory every test process of this session sees: pytest-xdist gives each
  worker its own basetemp, and their parent is the session's."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = root / name
  path.mkdir(exist_ok=True)
  return path


@contextlib.contextmanager
def built_once(path: pathlib.Path):
  """Yields True to the one process that must build PATH's contents, False to the rest.

  A file lock serialises the workers; '.ready' marks a finished build, so a worker
  never sees half of one.
  """
  with open(path / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    ready = path / ".ready"
    if ready.exists():
      yield False
      return
    yield True
    ready.write_text("ok")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> pathlib.Path:
  """Root holding workdir/ (a trained smoke run) and raw/ (its synthetic Kaggle tree).

  Trained once per test session (once for all xdist workers) and shared by the
  inference, evaluate, predict, serve and benchmark tests, which only read it.
  """
  root = shared_dir(tmp_path_factory, "smoke_run")
  with built_once(root) as build:
    if build:
      from nerveseg_jax import train
      from nerveseg_jax.configs import unet
      config = unet.get_config("smoke")
      config.data.data_dir = str(root / "tfds")
      config.data.manual_dir = str(root / "raw")
      config.num_train_steps = SMOKE_STEPS
      config.learning_rate = 1e-2
      config.model.features = 8
      config.eval_every_steps = SMOKE_STEPS // 2
      config.checkpoint_every_steps = SMOKE_STEPS // 2
      from nerveseg_jax.data import synthetic
      if (root / "raw").exists():
        shutil.rmtree(root / "raw")  # a build that died half-way
      synthetic.write_tree(root / "raw", subjects=config.data.synthetic_subjects,
                           frames=config.data.synthetic_frames,
                           seed=config.data.synthetic_seed,
                           nerve_contrast=SMOKE_NERVE_CONTRAST)
      train.train_and_evaluate(config, root / "workdir")
  return root


@pytest.fixture(scope="session")
def calibrated_run(smoke_run, tmp_path_factory) -> pathlib.Path:
  """A copy of the smoke run's workdir, evaluated and calibrated on its validation fold."""
  root = shared_dir(tmp_path_factory, "calibrated")
  workdir = root / "workdir"
  with built_once(root) as build:
    if build:
      import shutil
      from nerveseg_jax import evaluate
      if workdir.exists():
        shutil.rmtree(workdir)  # a build that died half-way
      shutil.copytree(smoke_run / "workdir", workdir)
      assert evaluate.main(["--workdir", str(workdir)]) == 0
  return workdir


def pytest_runtest_logfinish(nodeid, location):
  """With NERVESEG_RSS_LOG=FILE, each test appends `pid peak_rss_kb nodeid` to FILE:
  the test during which a worker's peak grew is the one that made it grow."""
  path = os.environ.get("NERVESEG_RSS_LOG")
  if path:
    import resource  # pylint: disable=g-import-not-at-top
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(path, "a") as f:
      f.write(f"{os.getpid()} {peak} {nodeid}\n")
