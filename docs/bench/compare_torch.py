#!/usr/bin/env python3
"""Side-by-side CPU comparison with the PyTorch reference, as ratios (docs/performance.md).

Runs, interleaved round by round so that both sides see the same machine load:
  1. ../shared/bench/torch_unet_reference.py       (PyTorch eager training step)
  2. docs/bench/torch_unet_forward.py              (PyTorch eager forward, batched)
  3. python -m nerveseg_jax.benchmark --config configs/unet.py:torch_reference
and prints images/s per round and the ratios (this project / PyTorch) of the medians.

Usage, from the repository root:
  python docs/bench/compare_torch.py --torch_python ~/torchvenv/bin/python [--rounds 3]
      [--steps 5] [--json OUT]
"""
import argparse
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
TORCH_TRAIN = REPO.parent / "shared" / "bench" / "torch_unet_reference.py"
TORCH_FORWARD = REPO / "docs" / "bench" / "torch_unet_forward.py"
_IMG_S = re.compile(r"([0-9.]+) img/s")


def _torch(python: str, script: pathlib.Path, steps: int) -> float:
  out = subprocess.run([python, str(script), "--steps", str(steps)], check=True,
                       capture_output=True, text=True).stdout
  match = _IMG_S.search(out)
  if not match:
    raise SystemExit(f"{script}: no 'img/s' figure in its output:\n{out}")
  return float(match.group(1))


def _jax(steps: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "bench.json"
    subprocess.run([sys.executable, "-m", "nerveseg_jax.benchmark",
                    "--config", str(REPO / "configs" / "unet.py") + ":torch_reference",
                    "--steps", str(steps), "--nopipeline", "--json", str(path)],
                   check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(path.read_text())


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--torch_python", required=True, help="python of a venv with torch")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--json")
  a = p.parse_args()
  if not TORCH_TRAIN.exists():
    raise SystemExit(f"{TORCH_TRAIN}: the shared PyTorch reference is missing")
  rows = []
  for r in range(a.rounds):
    row = {"torch_train": _torch(a.torch_python, TORCH_TRAIN, a.steps)}
    j = _jax(a.steps)
    row["jax_train"] = j["train_images_per_s"]
    row["jax_forward"] = j["infer_images_per_s_model_size"]
    row["torch_forward"] = _torch(a.torch_python, TORCH_FORWARD, a.steps)
    rows.append(row)
    print(f"round {r + 1}: train torch {row['torch_train']:.2f} jax {row['jax_train']:.2f} "
          f"img/s ({row['jax_train'] / row['torch_train']:.2f}x); forward torch "
          f"{row['torch_forward']:.2f} jax {row['jax_forward']:.2f} img/s "
          f"({row['jax_forward'] / row['torch_forward']:.2f}x)", flush=True)
  med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
  summary = {"rounds": rows, "median": med,
             "train_ratio": med["jax_train"] / med["torch_train"],
             "forward_ratio": med["jax_forward"] / med["torch_forward"],
             "per_round_train_ratio": [r["jax_train"] / r["torch_train"] for r in rows],
             "per_round_forward_ratio": [r["jax_forward"] / r["torch_forward"] for r in rows]}
  print(f"median: train {summary['train_ratio']:.2f}x PyTorch eager, "
        f"forward {summary['forward_ratio']:.2f}x")
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
  main()
