"""The package's XLA:CPU flags: added once, never over a user's own setting."""

import os

from nerveseg_jax import xla_flags


def test_flags_are_in_force_for_this_process():
  import nerveseg_jax  # noqa: F401  (applied on import, before any backend starts)
  assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"]
  assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]


def test_appends_keeps_user_flags_and_is_idempotent():
  env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  once = xla_flags.apply_cpu_xla_flags(env)
  assert once == "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type="
  assert xla_flags.apply_cpu_xla_flags(env) == once


def test_user_value_wins_and_opt_out():
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=all"}
  assert xla_flags.apply_cpu_xla_flags(env) == "--xla_cpu_experimental_ynn_fusion_type=all"
  env = {"NERVESEG_NO_XLA_FLAGS": "1"}
  assert xla_flags.apply_cpu_xla_flags(env) == "" and "XLA_FLAGS" not in env
