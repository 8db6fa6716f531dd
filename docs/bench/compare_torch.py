#!/usr/bin/env python3
"""Side-by-side CPU comparison with the PyTorch reference, as ratios (docs/performance.md).

Runs, interleaved round by round so that every side sees the same machine load:
  1. ../shared/bench/torch_unet_reference.py            (PyTorch eager training step)
  2. the same with --compile                            (torch.compile training step)
  3. docs/bench/torch_unet_forward.py                   (PyTorch eager forward, batched)
  4. python -m nerveseg_jax.benchmark --config configs/unet.py:torch_reference
and prints images/s per round and the ratios (this project / PyTorch) of the medians.
The host (lscpu's model name, family, model, and whether it has AVX2, AVX-512 and bf16
instructions) is recorded with the figures: CPU ratios depend on it.

Usage, from the repository root:
  python docs/bench/compare_torch.py --torch_python ~/torchvenv/bin/python [--rounds 3]
      [--steps 5] [--no_compile] [--json OUT]
  ... --smoke: tiny sizes and 1 step on every side, a plumbing check (not a measurement)
"""
import argparse
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

from nerveseg_jax import hostinfo

REPO = pathlib.Path(__file__).resolve().parents[2]
TORCH_TRAIN = REPO.parent / "shared" / "bench" / "torch_unet_reference.py"
TORCH_FORWARD = REPO / "docs" / "bench" / "torch_unet_forward.py"
_IMG_S = re.compile(r"([0-9.]+) img/s")
# --smoke sizes: the same architecture family, 1 level down, at 32x32.
_SMOKE_TORCH = ["--batch", "2", "--height", "32", "--width", "32", "--features", "8,16"]
_SMOKE_JAX = ["--config.batch_size=2", "--config.data.image_size=(32, 32)",
              "--config.model.features=8", "--config.model.depth=1", "--infer_batch", "2",
              "--latency_iters", "3"]


def _torch(python: str, script: pathlib.Path, steps: int, extra: list[str]) -> float:
  out = subprocess.run([python, str(script), "--steps", str(steps), *extra], check=True,
                       capture_output=True, text=True).stdout
  match = _IMG_S.search(out)
  if not match:
    raise SystemExit(f"{script}: no 'img/s' figure in its output:\n{out}")
  return float(match.group(1))


def _jax(steps: int, extra: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "bench.json"
    subprocess.run([sys.executable, "-m", "nerveseg_jax.benchmark",
                    "--config", str(REPO / "configs" / "unet.py") + ":torch_reference",
                    "--steps", str(steps), "--nopipeline", "--json", str(path), *extra],
                   check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(path.read_text())


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--torch_python", required=True, help="python of a venv with torch")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--no_compile", action="store_true", help="skip the torch.compile side")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes, 1 round of 1 step: checks that every side runs")
  p.add_argument("--json")
  a = p.parse_args()
  if not TORCH_TRAIN.exists():
    raise SystemExit(f"{TORCH_TRAIN}: the shared PyTorch reference is missing")
  torch_extra, jax_extra = (_SMOKE_TORCH, _SMOKE_JAX) if a.smoke else ([], [])
  rounds, steps = (1, 1) if a.smoke else (a.rounds, a.steps)
  host = hostinfo.cpu()
  print(f"host: {hostinfo.describe(host)}", flush=True)
  rows = []
  for r in range(rounds):
    row = {"torch_train": _torch(a.torch_python, TORCH_TRAIN, steps, torch_extra)}
    if not a.no_compile:
      # The reference times its first (compiling) step apart from the steady ones.
      row["torch_compile_train"] = _torch(a.torch_python, TORCH_TRAIN, steps,
                                          [*torch_extra, "--compile"])
    j = _jax(steps, jax_extra)
    row["jax_train"] = j["train_images_per_s"]
    row["jax_forward"] = j["infer_images_per_s_model_size"]
    row["torch_forward"] = _torch(a.torch_python, TORCH_FORWARD, steps, torch_extra)
    rows.append(row)
    compiled = (f", torch.compile {row['torch_compile_train']:.2f} "
                f"({row['jax_train'] / row['torch_compile_train']:.2f}x)"
                if "torch_compile_train" in row else "")
    print(f"round {r + 1}: train torch {row['torch_train']:.2f} jax {row['jax_train']:.2f} "
          f"img/s ({row['jax_train'] / row['torch_train']:.2f}x){compiled}; forward torch "
          f"{row['torch_forward']:.2f} jax {row['jax_forward']:.2f} img/s "
          f"({row['jax_forward'] / row['torch_forward']:.2f}x)", flush=True)
  med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
  summary = {"host": host, "smoke": a.smoke, "steps": steps, "rounds": rows, "median": med,
             "train_ratio": med["jax_train"] / med["torch_train"],
             "forward_ratio": med["jax_forward"] / med["torch_forward"],
             "per_round_train_ratio": [r["jax_train"] / r["torch_train"] for r in rows],
             "per_round_forward_ratio": [r["jax_forward"] / r["torch_forward"] for r in rows]}
  if "torch_compile_train" in med:
    summary["train_ratio_vs_compile"] = med["jax_train"] / med["torch_compile_train"]
    summary["per_round_train_ratio_vs_compile"] = [
        r["jax_train"] / r["torch_compile_train"] for r in rows]
  print("| side | images/s (median) |\n|---|---|")
  for k, v in med.items():
    print(f"| {k} | {v:.2f} |")
  vs_compile = (f", {summary['train_ratio_vs_compile']:.2f}x torch.compile"
                if "train_ratio_vs_compile" in summary else "")
  print(f"median: train {summary['train_ratio']:.2f}x PyTorch eager{vs_compile}, "
        f"forward {summary['forward_ratio']:.2f}x eager")
  print(f"host: {hostinfo.describe(host)}")
  if a.smoke:
    print("smoke run: tiny sizes and 1 step; these figures are not measurements")
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
  main()
