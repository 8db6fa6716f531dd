"""First contact with every command: --help, a wrong --config, what a short run prints,
and progress lines (a tqdm bar on a terminal, plain lines elsewhere)."""

import argparse
import importlib
import io
import logging
import re
import shutil
import subprocess
import sys

import pytest

from nerveseg_jax import cli
from test_train import REPO, SUBPROCESS_ENV, smoke_data_dir

FACES = ("train", "evaluate", "predict", "serve", "benchmark", "sweep", "convert_keras")
# What a normal run must never print on stderr.
ALARMS = re.compile(r"Traceback|warn|WARNING|Metadata file does not exist", re.IGNORECASE)


def face_parser(face: str, monkeypatch) -> argparse.ArgumentParser:
  """The parser FACE builds (taken at cli.parse, before anything runs)."""
  module = importlib.import_module(f"nerveseg_jax.{face}")
  seen = []

  def capture(p, argv):
    seen.append(p)
    raise SystemExit(0)

  monkeypatch.setattr(cli, "parse", capture)
  assert module.main([]) == 0
  return seen[0]


def words(text: str) -> str:
  return " ".join(text.split())


def entry(section: str, flag: str) -> str | None:
  """What follows FLAG where its own entry of an argparse options section starts."""
  found = re.search(rf"^ +(?:-\w+, )*{re.escape(flag)}(?![\w-])", section, re.M)
  return None if found is None else words(section[found.end():])


@pytest.mark.parametrize("face", FACES)
def test_help_lists_every_flag_with_its_help(face, monkeypatch):
  p = subprocess.run([sys.executable, "-m", f"nerveseg_jax.{face}", "--help"], cwd=REPO,
                     env=dict(SUBPROCESS_ENV, COLUMNS="200"), capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "Traceback" not in p.stderr, p.stderr[-2000:]
  out = p.stdout
  section = out[out.index("\noptions:"):]
  flags = 0
  for action in face_parser(face, monkeypatch)._actions:
    for flag in action.option_strings:
      if not flag.startswith("--"):
        continue
      if action.help == argparse.SUPPRESS:
        # Only the --noNAME twin of a boolean --NAME is left out of the help.
        assert flag.startswith("--no") and entry(section, "--" + flag[4:]), flag
        continue
      flags += 1
      assert action.help and action.help.strip(), f"{face} {flag} has no help"
      after = entry(section, flag)
      assert after is not None, f"{face} --help does not list {flag}"
      # Its help follows the flag (and its metavar or choices) in the same entry.
      first = words(action.help % vars(action) if "%(" in action.help else action.help)
      assert first[:30] in after[:len(first[:30]) + 80], f"{face} {flag}: no help shown"
  assert flags >= 3  # --help, --verbosity and the face's own
  if face == "train":
    epilog = out[out.index("config variants"):]
    for name in ("unet", "classifier"):
      for variant in cli.config_variants(name):
        assert variant in epilog, variant
    examples = [line for line in epilog.splitlines()
                if line.strip().startswith("nerveseg-train --config")]
    assert len(examples) >= 2, epilog


# Faces that take --config, and the other flags they need to reach it.
CONFIG_FACES = {"train": [], "benchmark": [],
                "sweep": ["--sweep", "configs/sweeps/real_subset.py"],
                "evaluate": ["--workdir", "runs/none"]}


@pytest.mark.parametrize("face", sorted(CONFIG_FACES))
@pytest.mark.parametrize("given, named", [
    (None, "--config is required"),
    ("unte", "--config unte: no such config"),
    ("configs/nope.py", "--config configs/nope.py: no such file"),
    ("unet:smok", "unknown variant 'smok'"),
])
def test_a_wrong_config_is_one_line_naming_what_was_given_and_what_exists(
    face, given, named, capsys):
  if face == "evaluate" and given is None:
    pytest.skip("evaluate's --config is optional (the run's own config.json)")
  module = importlib.import_module(f"nerveseg_jax.{face}")
  argv = CONFIG_FACES[face] + ([] if given is None else ["--config", given])
  assert module.main(argv) == 2
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert named in lines[0] and "Traceback" not in err
  # What exists: the configs by name, or (for a variant) the config's variants.
  if given == "unet:smok":
    assert "smoke" in lines[0] and "synthetic" in lines[0], lines[0]
  else:
    assert all(name in lines[0] for name in cli.known_configs()), lines[0]


def test_a_wrong_config_on_the_command_line_has_no_traceback():
  p = subprocess.run([sys.executable, "-m", "nerveseg_jax.train", "--config", "unte"],
                     cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
  assert "--config unte: no such config; known: " in p.stderr and "unet" in p.stderr


def test_a_short_training_run_prints_a_short_readable_log(tmp_path_factory, tmp_path):
  data_dir = smoke_data_dir(tmp_path_factory)
  workdir = tmp_path / "run"
  p = subprocess.run(
      [sys.executable, "-m", "nerveseg_jax.train", "--config", "unet:smoke",
       "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
       "--config.num_train_steps=10", "--config.log_every_steps=5",
       "--config.eval_every_steps=10", "--config.checkpoint_every_steps=10"],
      cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = (p.stdout + p.stderr).splitlines()
  assert len(lines) <= 40, "\n".join(lines)
  assert not ALARMS.search(p.stderr), p.stderr
  text = "\n".join(lines)
  assert f"workdir  {workdir}" in text
  assert re.search(r"^devices  \d+ x ", text, re.M), text
  assert re.search(r"^data     .*train \d+ frames; validation \d+ frames of subjects \[",
                   text, re.M), text
  assert len(re.findall(r"^step (5|10)/10  loss [\d.]+ .* ETA \S+$", text, re.M)) == 2, text
  assert re.search(r"^step 10 validation: .*kaggle_score", text, re.M), text
  assert re.search(r"^saved checkpoint step 10$", text, re.M), text
  table = p.stdout[p.stdout.index(f"done: {workdir}"):]
  assert re.search(r"^step +10$", table, re.M) and "val_kaggle_score" in table, table


# ------------------------------------------------------------------------- progress


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


@pytest.fixture
def info_logging():
  level = cli.log.level
  cli.log.setLevel(logging.INFO)
  yield
  cli.log.setLevel(level)


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_off_a_terminal_progress_is_a_line_per_tenth_or_half_minute(info_logging):
  clock, out = Clock(), io.StringIO()

  def chunks():
    for _ in range(5):
      clock.now += 2.0  # 20 frames every 2 s: 10 frames/s
      yield list(range(20))

  got = [len(c) for c in cli.progress(chunks(), 100, "scored", size=len, stream=out,
                                      clock=clock)]
  assert got == [20] * 5
  lines = out.getvalue().splitlines()
  # A chunk is one line however many tenths it completes; the last line has the total.
  assert lines == ["scored 20/100 frames, 10.0 frames/s, ETA 8s",
                   "scored 40/100 frames, 10.0 frames/s, ETA 6s",
                   "scored 60/100 frames, 10.0 frames/s, ETA 4s",
                   "scored 80/100 frames, 10.0 frames/s, ETA 2s",
                   "scored 100 frames in 10s, 10.0 frames/s"]

  # Unknown total, or slow tenths: a line every 30 s.
  clock, out = Clock(), io.StringIO()
  bar = cli.Progress(None, "predicted", "files", stream=out, clock=clock)
  for _ in range(7):
    clock.now += 10.0
    bar.update(3)
  bar.close()
  assert out.getvalue().splitlines() == ["predicted 9 files, 0.3 files/s",
                                         "predicted 18 files, 0.3 files/s",
                                         "predicted 21 files in 1m10s, 0.3 files/s"]


def test_progress_is_silent_when_quiet_and_after_an_error(info_logging):
  clock, out = Clock(), io.StringIO()
  with pytest.raises(RuntimeError):
    with cli.Progress(10, "scored", stream=out, clock=clock) as bar:
      clock.now += 1.0
      bar.update(1)
      raise RuntimeError("inference failed")
  # No closing "scored N frames in ..." line: the loop did not finish.
  assert out.getvalue() == "scored 1/10 frames, 1.0 frames/s, ETA 9s\n"
  cli.log.setLevel(logging.WARNING)  # --verbosity quiet
  out = Terminal()
  assert list(cli.progress(range(10), 10, "scored", stream=out)) == list(range(10))
  assert out.getvalue() == ""


def test_on_a_terminal_progress_is_a_tqdm_bar(info_logging):
  out = Terminal()
  assert sum(cli.progress(range(50), 50, "scored", stream=out)) == sum(range(50))
  text = out.getvalue()
  assert "\r" in text and "/50" in text and "frames/s" in text  # tqdm's bar, redrawn
  assert text.rstrip().endswith("frames/s") and "scored 50 frames in " in text


# ------------------------------------------------------------------------- end to end


PROGRESS_LINE = r"^{} \d+/{} {}, [\d.]+ {}/s, ETA \S+$"


def test_evaluate_and_predict_print_plain_progress_quietly(
    smoke_run, calibrated_run, tmp_path, capsys, monkeypatch):
  from nerveseg_jax import evaluate, predict, scoring
  workdir = tmp_path / "workdir"
  shutil.copytree(calibrated_run, workdir)
  monkeypatch.setattr(scoring, "_CHUNK", 4)  # several chunks: lines before the last
  assert evaluate.main(["--workdir", str(workdir)]) == 0
  printed = capsys.readouterr()
  assert not ALARMS.search(printed.err), printed.err
  frames = int(re.search(r"\((\d+) frames", printed.out).group(1))
  assert frames > 4
  for desc in ("calibrated", "scored"):
    assert re.search(PROGRESS_LINE.format(desc, frames, "frames", "frames"), printed.err,
                     re.M), printed.err
    assert re.search(rf"^{desc} {frames} frames in \S+, [\d.]+ frames/s$", printed.err,
                     re.M), printed.err
  assert "\r" not in printed.err

  images = smoke_run / "raw" / "test"
  files = len(list(images.glob("*.tif")))
  assert files > 8
  assert predict.main(["--workdir", str(workdir), "--images", str(images),
                       "--output", str(tmp_path / "out"), "--batch_size", "2"]) == 0
  printed = capsys.readouterr()
  assert not ALARMS.search(printed.err), printed.err
  assert re.search(PROGRESS_LINE.format("predicted", files, "files", "files"), printed.err,
                   re.M), printed.err
  assert re.search(rf"^predicted {files} files in ", printed.err, re.M), printed.err
  assert "\r" not in printed.err
