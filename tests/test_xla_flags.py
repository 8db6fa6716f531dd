"""The package's XLA:CPU flags: set by the faces before JAX starts, never over a user's."""

import os
import subprocess
import sys

from nerveseg_jax import xla_flags

_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _python(code: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NERVESEG_NO_XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, timeout=120, check=True)


def test_flags_are_in_force_for_this_process():
  assert _FLAG in os.environ["XLA_FLAGS"]  # conftest calls configure() as the faces do
  assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]


def test_importing_the_package_changes_no_environment():
  out = _python("import os, nerveseg_jax.train, nerveseg_jax.inference; "
                "print(repr(os.environ.get('XLA_FLAGS')))")
  assert out.stdout.strip() == "None"


def test_configure_before_jax_starts_sets_the_flags_silently():
  out = _python("import os, warnings; warnings.simplefilter('error'); import jax; "
                "from nerveseg_jax import xla_flags; print(xla_flags.configure()); "
                "jax.devices(); print(os.environ['XLA_FLAGS'])")
  assert out.stdout.split() == ["True", _FLAG]


def test_configure_after_jax_started_warns_once_and_says_how():
  out = _python("import jax, warnings; jax.devices(); from nerveseg_jax import xla_flags\n"
                "with warnings.catch_warnings(record=True) as w:\n"
                "  warnings.simplefilter('always')\n"
                "  print(xla_flags.configure(), xla_flags.configure())\n"
                "print(len(w)); print(w[0].message)")
  lines = out.stdout.splitlines()
  assert lines[0] == "False False" and lines[1] == "1"
  assert _FLAG in lines[2] and "before JAX starts" in lines[2]


def test_appends_keeps_user_flags_and_is_idempotent():
  env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  once = xla_flags.apply_cpu_xla_flags(env)
  assert once == "--xla_dump_to=/tmp/x " + _FLAG
  assert xla_flags.apply_cpu_xla_flags(env) == once


def test_user_value_wins_and_opt_out():
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=all"}
  assert xla_flags.apply_cpu_xla_flags(env) == "--xla_cpu_experimental_ynn_fusion_type=all"
  assert xla_flags.missing(env) == []
  env = {"NERVESEG_NO_XLA_FLAGS": "1"}
  assert xla_flags.apply_cpu_xla_flags(env) == "" and "XLA_FLAGS" not in env
  assert xla_flags.missing(env) == []
