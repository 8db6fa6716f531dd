"""The device mesh, parameter/batch shardings and multi-process start-up.

One mesh with axes ``data`` and ``fsdp``. The batch is split over both; parameters
are replicated over ``data`` and, when ``mesh.fsdp > 1``, split over ``fsdp`` along
their largest divisible dimension (the optimizer state follows the parameters).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nerveseg_jax import compat

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")
_initialized = False


def _env_int(name: str) -> int:
  value = os.environ[name]
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def maybe_initialize_distributed() -> bool:
  """Starts jax.distributed when this process is one of many; returns whether it did.

  Explicit variables win: NERVESEG_COORDINATOR (host:port), NERVESEG_NUM_PROCESSES and
  NERVESEG_PROCESS_ID (set by launch/local.py, slurm.sbatch and the GKE specs).
  Otherwise clusters that JAX auto-detects (TPU pods, SLURM, Open MPI, k8s) are used.
  Must run before anything touches a device.
  """
  global _initialized
  if _initialized:
    return True
  if "NERVESEG_COORDINATOR" in os.environ:
    missing = [k for k in ("NERVESEG_NUM_PROCESSES", "NERVESEG_PROCESS_ID")
               if k not in os.environ]
    if missing:
      raise ValueError(f"NERVESEG_COORDINATOR is set but {', '.join(missing)} is not")
    num = _env_int("NERVESEG_NUM_PROCESSES")
    pid = _env_int("NERVESEG_PROCESS_ID")
    if not 0 <= pid < num:
      raise ValueError(f"NERVESEG_PROCESS_ID={pid} is outside [0, {num})")
    if num == 1:
      return False
    kwargs = dict(coordinator_address=os.environ["NERVESEG_COORDINATOR"],
                  num_processes=num, process_id=pid)
  elif compat.auto_detected_process_count() > 1:
    kwargs = {}
  else:
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms in ("", "cpu") or platforms.startswith("cpu"):
    # CPU processes need a collectives backend to talk to each other at all; gloo
    # is built into jaxlib. Harmless when an accelerator ends up being used.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = int(os.environ.get("NERVESEG_INIT_TIMEOUT", "300"))
  jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
  _initialized = True
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(mesh_cfg: Mapping[str, Any], devices: list | None = None) -> Mesh:
  """Mesh of axes (data, fsdp) from config; -1 in one axis takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {}
  for axis in BATCH_AXES:
    if axis not in mesh_cfg:
      raise ValueError(f"config key mesh.{axis} is missing")
    sizes[axis] = int(mesh_cfg[axis])
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError("only one of mesh.data, mesh.fsdp may be -1")
  for axis, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{axis}={s} must be a positive size or -1")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if n % fixed:
      raise ValueError(f"{n} devices cannot be split by mesh sizes {sizes}")
    sizes[free[0]] = n // fixed
  if sizes["data"] * sizes["fsdp"] != n:
    raise ValueError(f"mesh.data={sizes['data']} x mesh.fsdp={sizes['fsdp']} != "
                     f"{n} devices; use -1 for one axis")
  # Auto axes: the model code is written without sharding-in-types annotations.
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((sizes["data"], sizes["fsdp"]), BATCH_AXES,
                       axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shards the largest dimension divisible by fsdp; small or indivisible -> replicated."""
  if fsdp <= 1 or not shape:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp == 0 and shape[i] >= fsdp:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params or optimizer state)."""
  fsdp = mesh.shape["fsdp"]

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, param_spec(shape, fsdp))

  return jax.tree.map(one, abstract_state)
