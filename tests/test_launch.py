"""Tests of launch/ cluster scripts (TPU VM, SLURM, GKE, Docker): dry runs and errors.

The local launcher, which really runs processes, is tested in test_launch_local.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SHELL_SCRIPTS = ["lib.sh", "tpu_vm.sh", "slurm.sbatch", "gke/jobset.sh", "gke/xpk.sh"]
# A train argument that needs quoting everywhere: spaces, quotes, backslash, parens.
TRICKY = "--config.data.manual_dir=/data/it's a \"dir\"\\(1)"
TRAIN_ARGS = ["--config", "configs/unet.py", "--workdir", "gs://bkt/runs/unet", TRICKY]


def _clean_env(**extra: str) -> dict[str, str]:
  # Keep the caller's own settings of these scripts out of the tests.
  keep = {k: v for k, v in os.environ.items()
          if k in ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")}
  keep.update(extra)
  return keep


def _run(cmd: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=60, **kw)


def _commands(stdout: str) -> list[list[str]]:
  """The commands a script printed ('+ cmd' lines), split as a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines()
          if line.startswith("+ ")]


def _flag(cmd: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


# --- Cloud TPU VM -----------------------------------------------------------------


def test_tpu_vm_dry_run_substitutes_everything():
  env = _clean_env(TPU_NAME="nerve-v5e", ZONE="us-west4-a", PROJECT="proj-1",
                   ACCELERATOR_TYPE="v5litepod-32", SPOT="1",
                   CODE_GCS="gs://bkt/code.tgz")
  res = _run([str(LAUNCH / "tpu_vm.sh"), "--dry-run", "--", *TRAIN_ARGS], env)
  assert res.returncode == 0, res.stderr
  cmds = _commands(res.stdout)
  describe, delete, create, tar, upload, install, train = cmds
  where = ["--zone=us-west4-a", "--project=proj-1"]
  assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
  assert delete[4:6] == ["delete", "nerve-v5e"] and "--quiet" in delete
  assert create[4:6] == ["create", "nerve-v5e"] and all(w in create for w in where)
  assert "--accelerator-type=v5litepod-32" in create and "--spot" in create
  assert tar[:2] == ["tar", "-czf"] and str(REPO) in tar
  assert upload == ["gcloud", "storage", "cp", tar[2], "gs://bkt/code.tgz"]
  for ssh in (install, train):
    assert ssh[4:6] == ["ssh", "nerve-v5e"] and "--worker=all" in ssh
  setup = _flag(install, "--command")
  assert "gcloud storage cp gs://bkt/code.tgz" in setup
  assert "'.[tpu]'" in setup
  # The remote shell gets back exactly the training arguments we passed.
  remote = shlex.split(_flag(train, "--command"))
  assert remote[:3] == ["cd", "nerveseg_jax", "&&"]
  assert remote[3:] == [".venv/bin/python", "-m", "nerveseg_jax.train", *TRAIN_ARGS]


def test_tpu_vm_detach_and_scp_without_gcs():
  env = _clean_env(TPU_NAME="t1", ZONE="europe-west4-b")
  res = _run([str(LAUNCH / "tpu_vm.sh"), "--dry-run", "--skip-create", "--detach",
              "--", "--config", "configs/unet.py", "--workdir", "/mnt/shared/r"], env)
  assert res.returncode == 0, res.stderr
  cmds = _commands(res.stdout)
  assert [c[4] for c in cmds if c[0] == "gcloud"] == ["scp", "ssh", "ssh"]
  scp = cmds[1]
  assert scp[6] == "t1:/tmp/nerveseg_jax-code.tgz" and "--worker=all" in scp
  train = _flag(cmds[-1], "--command")
  assert train.startswith("cd nerveseg_jax && nohup .venv/bin/python -m ")
  assert train.endswith("> train.log 2>&1 < /dev/null &")


@pytest.mark.parametrize("state,actions", [
    ("", ["describe", "create"]),
    ("PREEMPTED", ["describe", "delete", "create"]),
    ("READY", ["describe"]),
])
def test_tpu_vm_create_or_reuse(tmp_path, state, actions):
  # A stand-in gcloud: logs its calls; describe answers with FAKE_STATE (or fails).
  log = tmp_path / "calls"
  fake = tmp_path / "gcloud"
  fake.write_text(textwrap.dedent(f"""\
      #!/bin/sh
      echo "$*" >> {log}
      if [ "$4" = describe ]; then
        [ -n "$FAKE_STATE" ] || exit 1
        echo "$FAKE_STATE"
      fi
  """))
  fake.chmod(0o755)
  env = _clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}", TPU_NAME="t9",
                   ZONE="z1", FAKE_STATE=state)
  res = _run([str(LAUNCH / "tpu_vm.sh"), "--skip-install", "--", "--workdir",
              "gs://b/r"], env)
  assert res.returncode == 0, res.stderr
  calls = [c.split() for c in log.read_text().splitlines()]
  assert [c[3] for c in calls] == actions + ["ssh"]
  assert "--worker=all" in calls[-1]
  assert " ".join(calls[-1]).endswith(
      "--command=cd nerveseg_jax && .venv/bin/python -m nerveseg_jax.train "
      "--workdir gs://b/r")


def test_tpu_vm_errors_name_the_problem():
  res = _run([str(LAUNCH / "tpu_vm.sh"), "--dry-run", "--", "--config", "x"],
             _clean_env(ZONE="z"))
  assert res.returncode == 2 and "TPU_NAME" in res.stderr
  res = _run([str(LAUNCH / "tpu_vm.sh"), "--dry-run", "--bogus"],
             _clean_env(TPU_NAME="t", ZONE="z"))
  assert res.returncode == 2 and "--bogus" in res.stderr
  # No shared workdir: still runs, but warns.
  res = _run([str(LAUNCH / "tpu_vm.sh"), "--dry-run", "--", "--config", "x"],
             _clean_env(TPU_NAME="t", ZONE="z"))
  assert res.returncode == 0 and "no --workdir" in res.stderr


# --- SLURM ---------------------------------------------------------------------------


def test_slurm_per_gpu_dry_run():
  # SLURM_NTASKS from an sbatch with other --ntasks* values must not leak into srun.
  env = _clean_env(SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8",
                   SLURM_CPUS_PER_TASK="6", SLURM_NTASKS="4")
  res = _run(["bash", str(LAUNCH / "slurm.sbatch"), "--dry-run", "--", *TRAIN_ARGS],
             env)
  assert res.returncode == 0, res.stderr
  srun, requeue = _commands(res.stdout)
  # --ntasks and --cpus-per-task explicitly: srun would take SLURM_NTASKS from the job,
  # and since Slurm 22.05 it no longer inherits sbatch's --cpus-per-task.
  assert srun == ["srun", "--kill-on-bad-exit=1", "--nodes=4", "--ntasks=32",
                  "--ntasks-per-node=8", "--cpus-per-task=6",
                  "python3", "-m", "nerveseg_jax.train", *TRAIN_ARGS]
  assert requeue == ["scontrol", "requeue", "JOB_ID"]
  header = (LAUNCH / "slurm.sbatch").read_text()
  assert "#SBATCH --signal=TERM@" in header and "#SBATCH --requeue" in header


def test_slurm_per_node_task_environment(tmp_path):
  env = _clean_env(PROCS="per_node", SLURM_JOB_NUM_NODES="3", SLURM_JOB_ID="4100",
                   HEAD_NODE="gpu-a17", PYTHON="python3", SLURM_CPUS_ON_NODE="96")
  res = _run(["bash", str(LAUNCH / "slurm.sbatch"), "--dry-run", "--", *TRAIN_ARGS],
             env)
  assert res.returncode == 0, res.stderr
  srun, requeue = _commands(res.stdout)
  assert requeue == ["scontrol", "requeue", "4100"]
  # One task per node, with all the node's CPUs.
  assert srun[:6] == ["srun", "--kill-on-bad-exit=1", "--nodes=3", "--ntasks=3",
                      "--ntasks-per-node=1", "--cpus-per-task=96"]
  exported = dict(kv.split("=", 1) for kv in _flag(srun, "--export").split(",")[1:])
  # JAX's own SLURM port rule, so a per_gpu and a per_node job pick ports alike.
  assert exported == {"NERVESEG_COORDINATOR": f"gpu-a17:{4100 % 4096 + 61440}",
                      "NERVESEG_NUM_PROCESSES": "3"}
  task = srun[7:]
  assert task[-len(TRAIN_ARGS) - 3:] == ["python3", "-m", "nerveseg_jax.train",
                                         *TRAIN_ARGS]
  # Run the per-task wrapper as srun would on the third node, with a program that
  # shows what the training process would see.
  probe = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
  wrapper = task[:-len(TRAIN_ARGS) - 3] + probe
  seen = json.loads(subprocess.run(
      wrapper, env=_clean_env(SLURM_PROCID="2", SLURM_LOCALID="0",
                              SLURM_JOB_ID="4100"),
      capture_output=True, text=True, check=True, timeout=30).stdout)
  assert seen["NERVESEG_PROCESS_ID"] == "2"
  assert "SLURM_LOCALID" not in seen  # else JAX would pin the process to GPU 0


@pytest.mark.parametrize("train_rc,requeued", [(0, False), (143, True), (1, False)])
def test_slurm_requeues_after_sigterm_stop(tmp_path, train_rc, requeued):
  # Stand-ins for srun (the training step ends with train_rc) and scontrol.
  log = tmp_path / "calls"
  for name, rc in (("srun", train_rc), ("scontrol", 0)):
    tool = tmp_path / name
    tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit {rc}\n')
    tool.chmod(0o755)
  env = _clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="991",
                   SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4")
  res = _run(["bash", str(LAUNCH / "slurm.sbatch"), "--", "--workdir", "/shared/w"],
             env)
  assert res.returncode == train_rc, res.stderr
  calls = log.read_text().splitlines()
  assert calls[0].startswith(
      "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=8 --ntasks-per-node=4 python3 ")
  assert calls[1:] == (["scontrol requeue 991"] if requeued else [])


def test_slurm_rejects_unknown_mode():
  res = _run(["bash", str(LAUNCH / "slurm.sbatch"), "--dry-run"],
             _clean_env(PROCS="per_core"))
  assert res.returncode == 2 and "PROCS" in res.stderr


# --- GKE: JobSet and XPK ---------------------------------------------------------------


def _render(target: str, **env: str) -> dict:
  yaml = pytest.importorskip("yaml")
  res = _run([str(LAUNCH / "gke/jobset.sh"), "--render", target, "--", *TRAIN_ARGS],
             _clean_env(IMAGE="us-docker.pkg.dev/p/r/nerveseg:1", **env))
  assert res.returncode == 0, res.stderr
  return yaml.safe_load(res.stdout)


def _pod(manifest: dict) -> dict:
  (rjob,) = manifest["spec"]["replicatedJobs"]
  return rjob, rjob["template"]["spec"]["template"]["spec"]


def test_jobset_tpu_manifest():
  m = _render("tpu", JOB_NAME="unet-v5e", NUM_SLICES="2", TPU_TOPOLOGY="2x4",
              NUM_NODES="2", SPOT="1")
  assert (m["apiVersion"], m["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
  assert m["metadata"]["name"] == "unet-v5e"
  rjob, pod = _pod(m)
  assert rjob["replicas"] == 2
  assert rjob["template"]["spec"]["parallelism"] == 2
  assert pod["nodeSelector"] == {
      "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
      "cloud.google.com/gke-tpu-topology": "2x4",
      "cloud.google.com/gke-spot": "true"}
  (c,) = pod["containers"]
  assert c["image"] == "us-docker.pkg.dev/p/r/nerveseg:1"
  assert c["command"] + c["args"] == ["python", "-m", "nerveseg_jax.train",
                                      *TRAIN_ARGS]
  assert c["resources"]["limits"] == {"google.com/tpu": 4}
  assert pod["terminationGracePeriodSeconds"] == 120


def test_jobset_gpu_manifest():
  m = _render("gpu", JOB_NAME="unet-h100", NUM_NODES="4")
  rjob, pod = _pod(m)
  assert rjob["name"] == "workers" and rjob["template"]["spec"]["completions"] == 4
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
  (c,) = pod["containers"]
  assert c["args"] == TRAIN_ARGS
  env = {e["name"]: e for e in c["env"]}
  # Pod 0 of the JobSet's headless service hosts the coordinator.
  assert env["NERVESEG_COORDINATOR"]["value"] == (
      "unet-h100-workers-0-0.unet-h100:1234")
  assert env["NERVESEG_NUM_PROCESSES"]["value"] == "4"
  assert "job-completion-index" in (
      env["NERVESEG_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"])
  assert c["resources"]["limits"] == {"nvidia.com/gpu": 8}


def test_jobset_dry_run_and_errors():
  env = _clean_env(IMAGE="img:2", JOB_NAME="j1")
  res = _run([str(LAUNCH / "gke/jobset.sh"), "--dry-run", "gpu", "--", "--config",
              "c", "--workdir", "gs://b/w"], env)
  assert res.returncode == 0, res.stderr
  (apply,) = _commands(res.stdout)
  assert apply[:3] == ["kubectl", "apply", "-f"] and apply[3].endswith("j1.jobset.yaml")
  assert "kind: JobSet" in res.stdout
  bad = [(dict(IMAGE="i", JOB_NAME="Bad_Name"), "JOB_NAME"),
         (dict(IMAGE="i", NUM_NODES="two"), "NUM_NODES"),
         (dict(), "IMAGE")]
  for extra, named in bad:
    res = _run([str(LAUNCH / "gke/jobset.sh"), "--render", "tpu"], _clean_env(**extra))
    assert res.returncode == 2 and named in res.stderr, (extra, res.stderr)
  res = _run([str(LAUNCH / "gke/jobset.sh"), "--render", "cpu"], _clean_env(IMAGE="i"))
  assert res.returncode == 2 and "tpu or gpu" in res.stderr


def test_xpk_tpu_dry_run():
  env = _clean_env(CLUSTER="xpk-1", IMAGE="img:3", JOB_NAME="run7", NUM_SLICES="2",
                   PROJECT="p", ZONE="us-east5-b")
  res = _run([str(LAUNCH / "gke/xpk.sh"), "--dry-run", "tpu", "--", *TRAIN_ARGS], env)
  assert res.returncode == 0, res.stderr
  (xpk,) = _commands(res.stdout)
  assert xpk[:3] == ["xpk", "workload", "create"]
  for flag in ("--cluster=xpk-1", "--workload=run7", "--docker-image=img:3",
               "--tpu-type=v5litepod-16", "--num-slices=2", "--project=p",
               "--zone=us-east5-b", "--max-restarts=3"):
    assert flag in xpk
  assert shlex.split(_flag(xpk, "--command")) == [
      "python", "-m", "nerveseg_jax.train", *TRAIN_ARGS]


# XPK's GPU manifests also carry the command as a double-quoted YAML string, so it may
# hold spaces and shell syntax, but no quotes or backslashes.
GPU_TRAIN_ARGS = ["--config", "configs/unet.py", "--workdir", "gs://bkt/runs/unet",
                  "--config.data.manual_dir=/data/a dir (1) $HOME"]


def test_xpk_gpu_command_maps_the_rank_variables(tmp_path):
  yaml = pytest.importorskip("yaml")
  env = _clean_env(CLUSTER="xpk-1", IMAGE="img:3", NUM_NODES="4")
  res = _run([str(LAUNCH / "gke/xpk.sh"), "--dry-run", "gpu", "--", *GPU_TRAIN_ARGS],
             env)
  assert res.returncode == 0, res.stderr
  (xpk,) = _commands(res.stdout)
  assert "--device-type=h100-80gb-8" in xpk and "--num-nodes=4" in xpk
  command = _flag(xpk, "--command")
  # XPK writes the GPU command into its manifest twice: as a line of a block scalar
  # (`bash -c |`) and as env `COMMAND` with `value: "<command>"`. Both must parse back
  # to the same string.
  manifest = yaml.safe_load(textwrap.dedent(f"""\
      env:
      - name: COMMAND
        value: "{command}"
      script: |
        ({command}) & PID=$!;
  """))
  assert manifest["env"][0]["value"] == command
  assert manifest["script"] == f"({command}) & PID=$!;\n"
  # Run the pod's command under the variables XPK gives a GPU pod, with a stand-in
  # `python` that reports what it got.
  fake = tmp_path / "python"
  fake.write_text('#!/bin/sh\nenv | grep ^NERVESEG_ | sort\nprintf "%s\\n" "$@"\n')
  fake.chmod(0o755)
  pod_env = _clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}",
                       JAX_COORDINATOR_ADDRESS="run-workers-0-0.run",
                       JAX_COORDINATOR_PORT="6002", NNODES="4", NODE_RANK="3")
  out = subprocess.run(["bash", "-c", command], env=pod_env,
                       capture_output=True, text=True, check=True,
                       timeout=30).stdout.splitlines()
  assert out[:3] == ["NERVESEG_COORDINATOR=run-workers-0-0.run:6002",
                     "NERVESEG_NUM_PROCESSES=4", "NERVESEG_PROCESS_ID=3"]
  assert out[3:] == ["-m", "nerveseg_jax.train", *GPU_TRAIN_ARGS]


@pytest.mark.parametrize("arg", ["--config.name=it's", '--config.name="x"',
                                 "--config.name=a\\b"])
def test_xpk_gpu_refuses_what_its_yaml_cannot_hold(arg):
  res = _run([str(LAUNCH / "gke/xpk.sh"), "--dry-run", "gpu", "--", arg],
             _clean_env(CLUSTER="c", IMAGE="i"))
  assert res.returncode == 2 and "quotes or backslashes" in res.stderr, res.stderr
  assert "xpk workload create" not in res.stdout
  # The TPU command only goes into the block scalar, where any of them is fine.
  res = _run([str(LAUNCH / "gke/xpk.sh"), "--dry-run", "tpu", "--", arg],
             _clean_env(CLUSTER="c", IMAGE="i"))
  assert res.returncode == 0, res.stderr
  (xpk,) = _commands(res.stdout)
  assert shlex.split(_flag(xpk, "--command"))[-1] == arg


def test_xpk_refuses_a_newline():
  res = _run([str(LAUNCH / "gke/xpk.sh"), "--dry-run", "tpu", "--", "--a=1\n2"],
             _clean_env(CLUSTER="c", IMAGE="i"))
  assert res.returncode == 2 and "control character" in res.stderr


def test_dockerfile_builds_from_the_tree():
  """What the GKE image copies exists, its EXTRA values are real extras, and no source
  tree shadows the installed package in the directory training runs from."""
  tomllib = pytest.importorskip("tomllib")
  lines = [l.split() for l in (LAUNCH / "gke/Dockerfile").read_text().splitlines()
           if l.strip() and not l.startswith("#")]
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  header = (LAUNCH / "gke/Dockerfile").read_text()
  for extra in re.findall(r"--build-arg EXTRA=(\w+)", header) + [
      l[1].split("=", 1)[1] for l in lines if l[:1] == ["ARG"]]:
    assert extra in extras, extra
  workdir = None
  in_workdir = []
  for words in lines:
    if words[0] == "WORKDIR":
      workdir = words[1]
    elif words[0] == "COPY":
      *sources, dest = words[1:]
      for src in sources:
        assert (REPO / src).exists(), src
      if workdir is not None and not dest.startswith("/"):
        in_workdir += [pathlib.PurePosixPath(dest).name or src for src in sources]
  assert workdir == "/app"
  # `python -m` puts the working directory first on sys.path: a copy of nerveseg_jax
  # there would hide the installed package's nerveseg_jax.configs/.datasets mapping.
  assert "nerveseg_jax" not in in_workdir and "configs" in in_workdir
  env = dict(w.split("=", 1) for l in lines if l[0] == "ENV" for w in l[1:])
  assert "/usr/local/nvidia/lib64" in env["LD_LIBRARY_PATH"].split(":")
  cmd = next(l for l in lines if l[0] == "CMD")
  assert " ".join(cmd[1:]).startswith('["python", "-m", "nerveseg_jax.train"')


# --- shellcheck ------------------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shellcheck_clean(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck; "
                ".ci/run installs it)")
  res = subprocess.run(["shellcheck", "-x", "-s", "bash", f"launch/{script}"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr
