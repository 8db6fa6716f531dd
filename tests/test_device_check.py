"""docs/bench/device_check.sh rehearsed on CPU with tiny settings, and its report merger."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "docs" / "bench" / "device_check.sh"
REPORT = REPO / "docs" / "bench" / "device_check_report.py"


def _env(out, **extra) -> dict:
  env = dict(os.environ, OUT=str(out), JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             DEVICE_CHECK_TINY="1", **extra)
  env.pop("XLA_FLAGS", None)  # one CPU device: the tiny batches need not divide by 8
  return env


def test_rehearsal_measures_keeps_partial_results_and_survives_a_timeout(tmp_path):
  # IRv2 compiles for minutes on CPU: its 15 s cap must kill it and keep the rest.
  res = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=_env(tmp_path, DEVICE_CHECK_ONLY="unet_bf16,irv2_bf16",
                                             TIMEOUT_IRV2_BF16_S="15"))
  assert res.returncode == 0, res.stdout + res.stderr
  report = json.loads((tmp_path / "device_check.json").read_text())
  m = report["measurements"]
  assert list(m) == ["unet_bf16", "irv2_bf16"]  # DEVICE_CHECK_ONLY, in the script's order
  assert m["irv2_bf16"]["status"] == "timed out" and m["irv2_bf16"]["limit_s"] == 15
  unet = m["unet_bf16"]
  assert unet["status"] == "ok", (tmp_path / "logs" / "unet_bf16.log").read_text()[-3000:]
  r = unet["results"]
  assert r["dtype"] == "bfloat16" and r["device_resident"] is True
  for key in ("compile_s", "train_images_per_s", "goodput", "infer_latency_ms_batch1",
              "infer_latency_ms_batch1_p95", "infer_frames_per_s", "fold_short_wall_s",
              "cv5_estimate_s"):
    assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
  md = (tmp_path / "device_check.md").read_text()
  assert "| status | ok | timed out |" in md and "5-fold CV, estimated (min)" in md
  assert (tmp_path / "logs" / "irv2_bf16.log").exists()
  assert not (REPO / "nerveseg_jax" / "configs").is_symlink()  # an install: no link made


def test_budget_spent_skips_measurements_but_still_reports(tmp_path):
  res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                       env=_env(tmp_path, DEVICE_CHECK_BUDGET_S="10"))
  assert res.returncode == 0, res.stdout + res.stderr
  m = json.loads((tmp_path / "device_check.json").read_text())["measurements"]
  assert list(m) == ["unet_bf16", "unet_fp32", "irv2_bf16"]
  assert {v["status"] for v in m.values()} == {"skipped"}
  assert not list((tmp_path / "parts").glob("*.json"))  # nothing ran


def test_report_merges_partial_json_failures_and_timeouts(tmp_path):
  parts = tmp_path / "parts"
  parts.mkdir()
  (parts / "status.tsv").write_text("a\t1\t50\t210\nb\t124\t90\t90\nc\t1\t3\t150\n")
  (parts / "a.json").write_text(json.dumps({
      "device_kind": "NVIDIA H200", "mfu": 0.25, "compile_s": 12.0, "cv5_estimate_s": 600.0,
      "errors": {"fold": "RuntimeError: boom"}}))
  (parts / "b.json").write_text(json.dumps({"device_kind": "NVIDIA H200", "compile_s": 80.0,
                                            "errors": {}}))  # killed after its train part
  subprocess.run([sys.executable, str(REPORT), "--parts", str(parts), "--out", str(tmp_path),
                  "--budget_s", "450", "--elapsed_s", "143"], check=True)
  m = json.loads((tmp_path / "device_check.json").read_text())["measurements"]
  assert [m[k]["status"] for k in "abc"] == ["partial", "timed out", "failed (exit 1)"]
  assert m["b"]["results"]["compile_s"] == 80.0 and m["c"]["results"] == {}
  md = (tmp_path / "device_check.md").read_text()
  assert "| MFU | 25.0% | n/a | n/a |" in md
  assert "| compile (s) | 12.0 | 80.0 | n/a |" in md
  assert "| 5-fold CV, estimated (min) | 10.0 | n/a | n/a |" in md
  assert "- a / fold: RuntimeError: boom" in md


def test_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  res = subprocess.run(["shellcheck", "-s", "bash", str(SCRIPT)], capture_output=True,
                       text=True, timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr
