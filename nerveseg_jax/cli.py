"""The one command-line layer of every face (train, evaluate, predict, serve, sweep,
benchmark, convert_keras): argparse, the flags they share, configs by name or path with
`--config.KEY=VALUE` overrides, quiet logging, and one-line errors.

Configs: `--config unet:synthetic` names a config of the installed package
(nerveseg_jax.configs), `--config configs/unet.py:smoke,folder` a file; after the colon
come the config's variants. `--config.KEY=VALUE` then sets any key, parsed as a Python
literal of the key's type (`--config.data.image_size="(96, 96)"`), in the order given.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import pathlib
import pkgutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections

log = logging.getLogger("nerveseg_jax")

# Errors a user causes: shown as one line (no traceback) by `run`.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError,
                                                FileExistsError, NotADirectoryError,
                                                PermissionError, KeyError)


class ConfigError(ValueError):
  """A --config that cannot be found or loaded, or an override of a missing key."""


# ----------------------------------------------------------------------------- configs


def known_configs() -> list[str]:
  """Config names of the installed package (`unet`, `classifier`, ...)."""
  from nerveseg_jax import configs  # pylint: disable=g-import-not-at-top
  return sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
                if not m.ispkg and m.name != "common" and not m.name.startswith("_"))


def _load_module(name_or_path: str):
  if name_or_path.endswith(".py") or os.sep in name_or_path or "/" in name_or_path:
    path = pathlib.Path(name_or_path).expanduser()
    if not path.is_file():
      raise ConfigError(f"--config {name_or_path}: no such file; configs by name: "
                        f"{', '.join(known_configs())}")
    spec = importlib.util.spec_from_file_location(f"_nerveseg_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  if name_or_path not in known_configs():
    raise ConfigError(f"--config {name_or_path}: no such config; known: "
                      f"{', '.join(known_configs())} (or a path to a .py file)")
  return importlib.import_module(f"nerveseg_jax.configs.{name_or_path}")


def config_variants(name_or_path: str) -> list[str]:
  """The variants a config offers (its VARIANTS table), for --help."""
  try:
    return list(getattr(_load_module(name_or_path), "VARIANTS", {}))
  except ConfigError:
    return []


def load_config(arg: str) -> ml_collections.ConfigDict:
  """`NAME[:VARIANTS]` or `PATH.py[:VARIANTS]` -> the config; errors name what was given."""
  if not arg:
    raise ConfigError(f"--config is required; known: {', '.join(known_configs())} "
                      "(e.g. --config unet:synthetic)")
  name, _, variants = arg.partition(":")
  module = _load_module(name)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config {arg}: {name} has no get_config(arg)")
  try:
    return module.get_config(variants) if variants else module.get_config()
  except ValueError as e:
    raise ConfigError(f"--config {arg}: {e}") from None


def _parse_value(text: str, current: Any, key: str) -> Any:
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected true or false")
  if isinstance(current, str) or current is None:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
    return value if current is None else text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"--config.{key}={text}: not a {type(current).__name__} "
                      f"(the key is {current!r})") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"--config.{key}={text}: expected a tuple like {current!r}")
    value = type(current)(value)
  elif type(value) is not type(current):
    raise ConfigError(f"--config.{key}={text}: expected a {type(current).__name__} "
                      f"like {current!r}")
  return value


def has_key(cfg: Mapping, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      return False
    node = node[part]
  return True


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Sets each (dotted key, text) in order; an unknown key is named exactly."""
  for key, text in overrides:
    parent_key, _, leaf = key.rpartition(".")
    parent = config
    for part in filter(None, parent_key.split(".")):
      if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
        break
      parent = parent[part]
    else:
      if isinstance(parent, ml_collections.ConfigDict) and leaf in parent:
        value = _parse_value(text, parent[leaf], key)
        with parent.unlocked() if parent.is_locked else contextlib.nullcontext():
          try:
            parent[leaf] = value
          except TypeError as e:
            raise ConfigError(f"--config.{key}={text}: {e}") from None
        continue
    close = _close_keys(config, key)
    raise ConfigError(f"unknown config key {key!r} (--config.{key}=...)"
                      + (f"; did you mean {', '.join(close)}?" if close else ""))
  return config


def _flat_keys(cfg: Mapping, prefix: str = "") -> list[str]:
  out = []
  for k, v in cfg.items():
    out.append(prefix + k)
    if isinstance(v, (ml_collections.ConfigDict, Mapping)):
      out += _flat_keys(v, prefix + k + ".")
  return out


def _close_keys(cfg: ml_collections.ConfigDict, key: str) -> list[str]:
  import difflib  # pylint: disable=g-import-not-at-top
  return difflib.get_close_matches(key, _flat_keys(cfg), n=3, cutoff=0.75)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(the other arguments, the --config.KEY=VALUE pairs in order)."""
  rest, overrides = [], []
  it = iter(range(len(argv)))
  for i in it:
    a = argv[i]
    if a.startswith("--config."):
      key, eq, value = a[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ConfigError(f"--config.{key} needs a value (--config.{key}=VALUE)")
        value = argv[i + 1]
        next(it, None)
      overrides.append((key, value))
    else:
      rest.append(a)
  return rest, overrides


def default_workdir(config_arg: str, config: ml_collections.ConfigDict) -> pathlib.Path:
  """./runs/<config name>[_<variant>], e.g. runs/unet_synthetic for unet:synthetic."""
  path, _, variant = config_arg.partition(":")
  name = pathlib.Path(path).stem or str(config.get("name", "run"))
  if variant:
    name += "_" + variant.replace(",", "_")
  return pathlib.Path("runs") / name


# ----------------------------------------------------------------------------- flags


def parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--verbosity", choices=("quiet", "info", "debug"), default="info",
                 help="info: the project's own lines; debug: also JAX, Orbax, absl, TF")
  return p


def add_config(p: argparse.ArgumentParser, *, required: bool = True,
               help_text: str = "config by name or path, with variants: "
                                "unet:synthetic, configs/unet.py:folder,cpu") -> None:
  p.add_argument("--config", required=False, default=None,
                 help=help_text + "; then --config.KEY=VALUE sets any key "
                                  "(e.g. --config.batch_size=16)")
  p.set_defaults(_config_required=required)


def add_workdir(p: argparse.ArgumentParser, *, multiple: bool = False, required: bool = True,
                help_text: str | None = None) -> None:
  if multiple:
    p.add_argument("--workdir", action="append", required=required,
                   help=help_text or "a trained run (repeat to ensemble several)")
  else:
    p.add_argument("--workdir", required=required, help=help_text or "the run's directory")


def add_bool(p: argparse.ArgumentParser, name: str, default: bool, help_text: str) -> None:
  """--NAME and --noNAME (absl's spelling, which scripts already use)."""
  group = p.add_mutually_exclusive_group()
  group.add_argument(f"--{name}", dest=name, action="store_true", default=default,
                     help=f"{help_text} (default: {'on' if default else 'off'})")
  group.add_argument(f"--no{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def add_inference(p: argparse.ArgumentParser, *, batch_size: int | None = 8,
                  classifier: bool = True) -> None:
  """The flags every face that runs a trained model shares."""
  p.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
  p.add_argument("--batch_size", type=int, default=batch_size,
                 help="frames per forward pass" + ("" if batch_size else
                                                   " (default: the run's eval batch)"))
  p.add_argument("--which", choices=("best", "latest"), default="best",
                 help="the best checkpoint by validation score, or the latest")
  if classifier:
    p.add_argument("--classifier_workdir", default=None,
                   help="a trained presence classifier run (the two-stage pipeline)")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
  """Parses flags and --config overrides; sets up logging. Bad input exits with 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = split_overrides(argv)
  except ConfigError as e:
    p.error(str(e))
  args = p.parse_args(rest)
  setup_logging(args.verbosity)
  args.config_arg = getattr(args, "config", None) or ""
  args.overrides = overrides
  if hasattr(args, "_config_required"):
    if args.config or args._config_required or overrides:
      try:
        args.config = apply_overrides(load_config(args.config_arg), overrides)
      except ConfigError as e:
        p.exit(2, f"error: {e}\n")
  elif overrides:
    p.error(f"unexpected --config.{overrides[0][0]}: this command takes no config")
  return args


# ----------------------------------------------------------------------------- output


_NOISY = ("absl", "jax", "jax._src", "orbax", "tensorflow", "tensorflow_datasets", "etils",
          "h5py", "PIL", "matplotlib", "urllib3", "httpx", "asyncio")


def setup_logging(verbosity: str = "info") -> None:
  """The project's lines at INFO as plain text; other libraries only at `debug`."""
  level = {"quiet": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}[verbosity]
  root = logging.getLogger()
  for h in list(root.handlers):
    root.removeHandler(h)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s" if verbosity != "debug" else
                                         "%(asctime)s %(name)s %(levelname)s %(message)s"))
  root.addHandler(handler)
  root.setLevel(level if verbosity == "debug" else logging.WARNING)
  log.setLevel(level)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbosity == "debug" else "3")
  if verbosity != "debug":
    for name in _NOISY:
      logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
  try:  # absl routes its own logging through the root logger once it is set up
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity("debug" if verbosity == "debug" else "error")
    absl_logging.use_python_logging(quiet=True)
  except ImportError:  # pragma: no cover
    pass


def duration(seconds: float) -> str:
  """12s, 3m05s, 1h02m; '?' when unknown (no rate yet)."""
  if seconds != seconds or seconds in (float("inf"), float("-inf")):
    return "?"
  seconds = int(round(max(0.0, seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _terminal(stream) -> bool:
  """A terminal a bar can be drawn on (a pseudo-terminal of width 0 draws nothing)."""
  try:
    if not stream.isatty():
      return False
  except (AttributeError, ValueError):  # no such method, or a closed stream
    return False
  try:
    return os.get_terminal_size(stream.fileno()).columns > 0
  except (AttributeError, ValueError, OSError):  # no file descriptor to ask
    return True


class Progress:
  """Progress of a long loop, on stderr (stdout stays the command's result).

  On a terminal: a tqdm bar with rate and ETA. Elsewhere (a log file, a pipe, CI) a
  bar's carriage returns would be garbage, so a plain line is printed whenever another
  tenth of TOTAL is done or EVERY_S seconds have passed, e.g. "scored 120/400 frames,
  35.2 frames/s, ETA 8s". Both end with one line: count, time and rate. Nothing is
  printed at --verbosity quiet.
  """

  def __init__(self, total: int | None, desc: str, unit: str = "frames", *,
               stream=None, every_s: float = 30.0,
               clock: Callable[[], float] = time.monotonic):
    self.total, self.desc, self.unit, self.n = total or None, desc, unit, 0
    self._stream = stream if stream is not None else sys.stderr
    self._every_s, self._clock = every_s, clock
    self._enabled = log.isEnabledFor(logging.INFO)
    self._bar = None
    if self._enabled and _terminal(self._stream):
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      # leave=False: the bar is replaced by the closing line, as off a terminal.
      self._bar = tqdm(total=self.total, desc=desc, unit=" " + unit, file=self._stream,
                       leave=False, dynamic_ncols=True)
    self._start = self._last = clock()
    self._next_tenth = 1

  def _rate(self, now: float) -> float:
    elapsed = now - self._start
    return self.n / elapsed if elapsed > 0 else 0.0

  def update(self, n: int = 1) -> None:
    self.n += n
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.update(n)
      return
    now = self._clock()
    tenth = self.n * 10 // self.total if self.total else 0
    unfinished = self.total is None or self.n < self.total  # the last line says the rest
    if unfinished and (tenth >= self._next_tenth or now - self._last >= self._every_s):
      self._next_tenth, self._last = tenth + 1, now
      rate = self._rate(now)
      line = f"{self.desc} {self.n}"
      if self.total:
        line += f"/{self.total}"
      line += f" {self.unit}, {rate:.1f} {self.unit}/s"
      if self.total and rate > 0:
        line += f", ETA {duration((self.total - self.n) / rate)}"
      print(line, file=self._stream, flush=True)

  def close(self, finished: bool = True) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._enabled and finished:
      now = self._clock()
      print(f"{self.desc} {self.n} {self.unit} in {duration(now - self._start)}, "
            f"{self._rate(now):.1f} {self.unit}/s", file=self._stream, flush=True)
    self._enabled = False  # closed: later calls print nothing

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, exc_type, *exc) -> bool:
    self.close(finished=exc_type is None)
    return False


def progress(iterable: Iterable[Any], total: int | None, desc: str, unit: str = "frames", *,
             size: Callable[[Any], int] | None = None, **kwargs) -> Iterator[Any]:
  """The items of ITERABLE, each counted once the loop has handled it: as one, or as
  SIZE(item) (a chunk of frames counts as its frames: one line per chunk, not a burst)."""
  with Progress(total, desc, unit, **kwargs) as bar:
    for item in iterable:
      yield item
      bar.update(1 if size is None else size(item))


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
  """A small aligned text table (floats to 4 places)."""
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  cells = [[fmt(v) for v in r] for r in rows]
  if header:
    cells.insert(0, list(header))
  widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))] if cells else []
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
  if header:
    lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def command(body: Callable[[Sequence[str] | None], int | None]
            ) -> Callable[[Sequence[str] | None], int]:
  """Makes BODY a face's `main(argv=None) -> exit status` (also its console script):
  the XLA:CPU flags are set before anything starts JAX, and a user's error (a bad
  file, key or value) is one line on stderr with exit status 2."""

  @functools.wraps(body)
  def main(argv: Sequence[str] | None = None) -> int:
    from nerveseg_jax import xla_flags  # pylint: disable=g-import-not-at-top
    xla_flags.configure()
    return run(body, argv)

  return main


def run(main: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None) -> int:
  """Calls main; a user's error (bad file, key or value) is one line on stderr, exit 2."""
  try:
    return int(main(argv) or 0)
  except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except USER_ERRORS as e:
    log.debug("traceback", exc_info=True)
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {message}", file=sys.stderr)
    return 2
