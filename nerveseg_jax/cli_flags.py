"""Command-line flags shared by train and sweep: --config FILE[:VARIANT] with
--config.KEY=VALUE overrides, and --workdir. A bad config file or key ends in one
message naming it, not a traceback.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Mapping

import ml_collections


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory (default ./runs/<config name>)")
  return flags.FLAGS


def default_workdir(config_arg: str, config: ml_collections.ConfigDict) -> pathlib.Path:
  """./runs/<file stem>[_<variant>], e.g. runs/unet_synthetic for configs/unet.py:synthetic."""
  path, _, variant = config_arg.partition(":")
  name = pathlib.Path(path).stem or str(config.get("name", "run"))
  if variant:
    name += "_" + variant.replace(",", "_")
  return pathlib.Path("runs") / name


def config_arg(argv: list[str]) -> str:
  """The --config value as given on the command line (file[:variant])."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def override_keys(argv: list[str]) -> list[str]:
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; a bad --config or --config.KEY ends in one message, not a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fl = define_flags()
  try:
    return fl(argv)
  except (AttributeError, KeyError) as e:
    # config_flags raises these for an override of a key the config does not have.
    hint = str(e).replace("\\n", "\n")
    hint = hint[hint.index("Did you mean"):].strip("\"' ") if "Did you mean" in hint else ""
    # A failed override leaves no parsed config: the keys are checked against the
    # config file as it is, so the one named is the one that does not exist.
    cfg = fl["config"].value
    if cfg is None:
      cfg = _load_config(config_arg(argv))
    unknown = [k for k in override_keys(argv) if cfg is not None and not has_key(cfg, k)]
    key = unknown[0] if unknown else str(e)
    raise SystemExit(f"error: unknown config key {key!r} (--config.{key}=...); "
                     f"{hint}".rstrip("; ")) from None
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    # config_flags embeds the config file's traceback: keep its first and last line.
    msg = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1].strip()}"
    raise SystemExit(f"error: {msg}") from None


def _load_config(arg: str) -> ml_collections.ConfigDict | None:
  """The config of FILE[:VARIANT] without overrides, or None if it cannot be built."""
  path, _, variant = arg.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_config_for_error", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()
  except Exception:  # pylint: disable=broad-except  # only refines an error message
    return None


def has_key(cfg: ml_collections.ConfigDict, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      return False
    node = node[part]
  return True
