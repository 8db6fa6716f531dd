#!/usr/bin/env python3
"""Merges device_check.sh's per-measurement JSON into device_check.json and .md.

Rerun after every measurement, so the report always holds what has been measured.
Needs only the standard library (it runs even where the JAX stack fails to import).
"""
import argparse
import json
import pathlib
import platform

# (label, key, format) rows of the Markdown table, one column per measurement.
ROWS = (
    ("device", "device_kind", "{}"), ("devices", "num_devices", "{}"),
    ("model", "model", "{}"), ("batch (global)", "batch_size", "{}"),
    ("image size", "image_size", "{}"), ("dtype", "dtype", "{}"),
    ("compile (s)", "compile_s", "{:.1f}"), ("train step (ms)", "train_step_ms", "{:.2f}"),
    ("train images/s", "train_images_per_s", "{:.0f}"),
    ("GFLOPs/step/device", "flops_per_step_per_device", "gflops"),
    ("peak TFLOP/s (table)", "peak_tflops_per_device", "{}"), ("MFU", "mfu", "pct"),
    ("input goodput (set on device)", "goodput", "{:.3f}"),
    ("pipeline images/s", "pipeline_images_per_s", "{:.0f}"),
    ("batch-1 420x580 p50 (ms)", "infer_latency_ms_batch1", "{:.2f}"),
    ("batch-1 420x580 p95 (ms)", "infer_latency_ms_batch1_p95", "{:.2f}"),
    ("batched 420x580 frames/s", "infer_frames_per_s", "{:.0f}"),
    ("short fold run: steps", "fold_short_steps", "{}"),
    ("short fold run: wall (s)", "fold_short_wall_s", "{:.1f}"),
    ("one fold, estimated (min)", "fold_estimate_s", "min"),
    ("5-fold CV, estimated (min)", "cv5_estimate_s", "min"),
    ("peak device memory (GiB)", "peak_device_bytes", "gib"),
    ("jax", "jax_version", "{}"),
)


def _fmt(value, fmt: str) -> str:
  if value is None:
    return "n/a"
  if fmt == "gflops":
    return f"{value / 1e9:.1f}"
  if fmt == "pct":
    return f"{100 * value:.1f}%"
  if fmt == "min":
    return f"{value / 60:.1f}"
  if fmt == "gib":
    return f"{value / 2**30:.2f}"
  return fmt.format(value)


def _status(rc: str) -> str:
  return {"0": "ok", "124": "timed out", "137": "killed (time)", "skipped": "skipped"}.get(
      rc, f"failed (exit {rc})")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--parts", required=True, help="device_check.sh's parts folder")
  p.add_argument("--out", required=True)
  p.add_argument("--budget_s", type=float, required=True)
  p.add_argument("--elapsed_s", type=float, required=True)
  a = p.parse_args()
  parts, out = pathlib.Path(a.parts), pathlib.Path(a.out)
  measurements = {}
  for line in (parts / "status.tsv").read_text().splitlines():
    name, rc, wall, limit = line.split("\t")
    path = parts / f"{name}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    status = _status(rc)
    if rc in ("0", "1") and results.get("errors"):  # --keep_going exits 1 after the rest ran
      status = "partial"
    measurements[name] = {"status": status, "exit_code": rc, "wall_s": float(wall),
                          "limit_s": float(limit), "results": results}
  report = {"budget_s": a.budget_s, "elapsed_s": a.elapsed_s,
            "host": {"machine": platform.machine(), "python": platform.python_version()},
            "measurements": measurements}
  (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")

  names = list(measurements)
  lines = [f"# device_check ({a.elapsed_s:.0f}s of a {a.budget_s:.0f}s budget)", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
           "| status | " + " | ".join(measurements[n]["status"] for n in names) + " |",
           "| wall (s) | " + " | ".join(f"{measurements[n]['wall_s']:.0f}" for n in names)
           + " |"]
  for label, key, fmt in ROWS:
    cells = [_fmt(measurements[n]["results"].get(key), fmt) for n in names]
    if any(c != "n/a" for c in cells):
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  errors = [f"- {n} / {part}: {err}" for n in names
            for part, err in (measurements[n]["results"].get("errors") or {}).items()]
  if errors:
    lines += ["", "Failed parts:", *errors]
  lines += ["", "Logs: logs/<measurement>.log; all figures: device_check.json."]
  (out / "device_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
