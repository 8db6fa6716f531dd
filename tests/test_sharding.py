"""Mesh from config, parameter shardings, and when jax.distributed starts."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from nerveseg_jax import sharding


def test_make_mesh_fills_minus_one():
  assert jax.device_count() == 8  # tests/conftest.py
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  assert mesh.size == 1


@pytest.mark.parametrize("cfg,match", [
    ({"data": 3, "fsdp": -1}, "cannot be split"),
    ({"data": 2, "fsdp": 2}, "!= 8 devices"),
    ({"data": -1, "fsdp": -1}, "only one"),
    ({"data": 0, "fsdp": 1}, "mesh.data=0"),
    ({"data": -1}, "mesh.fsdp is missing"),
])
def test_make_mesh_errors_name_the_key(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(cfg)


def test_param_spec_shards_largest_divisible_dim():
  assert sharding.param_spec((3, 3, 16, 64), 1) == P()
  assert sharding.param_spec((3, 3, 16, 64), 4) == P(None, None, None, "fsdp")
  assert sharding.param_spec((3, 3, 16, 6), 4) == P(None, None, "fsdp", None)
  assert sharding.param_spec((5,), 4) == P()     # indivisible -> replicated
  assert sharding.param_spec((), 4) == P()


def test_state_shardings_follow_the_mesh():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  tree = {"k": jax.ShapeDtypeStruct((8, 12), "float32"), "b": jax.ShapeDtypeStruct((3,), "float32")}
  sh = sharding.state_shardings(mesh, tree)
  assert sh["k"].spec == P(None, "fsdp") and sh["b"].spec == P()
  assert sharding.batch_sharding(mesh, 4).spec == P(("data", "fsdp"), None, None, None)


def test_single_process_does_not_initialize(monkeypatch):
  for k in ("NERVESEG_COORDINATOR", "NERVESEG_NUM_PROCESSES", "NERVESEG_PROCESS_ID",
            "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(k, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv("NERVESEG_COORDINATOR", "127.0.0.1:1")
  monkeypatch.setenv("NERVESEG_NUM_PROCESSES", "1")
  monkeypatch.setenv("NERVESEG_PROCESS_ID", "0")
  assert sharding.maybe_initialize_distributed() is False  # a group of one needs nothing


@pytest.mark.parametrize("env,match", [
    ({"NERVESEG_COORDINATOR": "h:1"}, "NERVESEG_NUM_PROCESSES, NERVESEG_PROCESS_ID"),
    ({"NERVESEG_COORDINATOR": "h:1", "NERVESEG_NUM_PROCESSES": "two",
      "NERVESEG_PROCESS_ID": "0"}, "NERVESEG_NUM_PROCESSES='two'"),
    ({"NERVESEG_COORDINATOR": "h:1", "NERVESEG_NUM_PROCESSES": "2",
      "NERVESEG_PROCESS_ID": "2"}, r"outside \[0, 2\)"),
])
def test_bad_launcher_environment(monkeypatch, env, match):
  for k in ("NERVESEG_NUM_PROCESSES", "NERVESEG_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match=match):
    sharding.maybe_initialize_distributed()


_CLUSTER_VARS = ("NERVESEG_COORDINATOR", "NERVESEG_NUM_PROCESSES", "NERVESEG_PROCESS_ID",
                 "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri")


@pytest.fixture
def fake_initialize(monkeypatch):
  """Records jax.distributed.initialize calls instead of starting a cluster."""
  for k in _CLUSTER_VARS:
    monkeypatch.delenv(k, raising=False)
  calls = []
  monkeypatch.setattr(sharding, "_initialized", False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  updates = []
  monkeypatch.setattr(jax.config, "update", lambda *a: updates.append(a))
  return calls, updates


def test_launcher_variables_start_jax_distributed(fake_initialize, monkeypatch):
  calls, updates = fake_initialize
  monkeypatch.setenv("NERVESEG_COORDINATOR", "10.0.0.1:1234")
  monkeypatch.setenv("NERVESEG_NUM_PROCESSES", "4")
  monkeypatch.setenv("NERVESEG_PROCESS_ID", "3")
  monkeypatch.setattr(jax, "process_index", lambda: 3)
  assert sharding.maybe_initialize_distributed() is True
  assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                        initialization_timeout=300)]
  assert ("jax_cpu_collectives_implementation", "gloo") in updates  # CPU processes
  assert sharding.maybe_initialize_distributed() is True and len(calls) == 1  # once


@pytest.mark.parametrize("ntasks,started", [("2", True), ("1", False)])
def test_slurm_is_detected_by_jax(fake_initialize, monkeypatch, ntasks, started):
  calls, _ = fake_initialize
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  for k, v in dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="node[001-002]",
                   SLURM_NTASKS=ntasks, SLURM_PROCID="0", SLURM_LOCALID="0").items():
    monkeypatch.setenv(k, v)
  assert sharding.maybe_initialize_distributed() is started
  # JAX's own SLURM detection fills in coordinator, count and id: no arguments here.
  assert calls == ([dict(initialization_timeout=300)] if started else [])


def test_no_pmap_in_the_package():
  """One mesh and jit shardings everywhere: no jax.pmap (nor its xmap/pjit relatives)."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(sharding.__file__).parent
  sources = list(root.rglob("*.py")) + list((root.parent / "configs").rglob("*.py"))
  assert len(sources) > 10
  used = [str(p) for p in sources if re.search(r"\b(pmap|xmap|pjit)\s*\(", p.read_text())]
  assert not used, used
