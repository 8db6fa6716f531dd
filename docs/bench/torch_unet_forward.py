#!/usr/bin/env python3
"""Forward-only (inference) counterpart of ../shared/bench/torch_unet_reference.py.

Times the very same PyTorch U-Net class (imported from the shared reference, not
rewritten) in eval mode under torch.inference_mode(), batched, plus the sigmoid, so it
sits beside the benchmark's "at model size, images/s" row (docs/performance.md).

Usage (in the torch venv): docs/bench/torch_unet_forward.py [--batch 16] [--height 128]
    [--width 128] [--steps 10] [--reference PATH]
"""
import argparse
import importlib.util
import pathlib
import time

import torch

_DEFAULT_REF = (pathlib.Path(__file__).resolve().parents[3] / "shared" / "bench"
                / "torch_unet_reference.py")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--height", type=int, default=128)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--features", default="32,64,128,256,512")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--reference", default=str(_DEFAULT_REF))
  a = p.parse_args()
  ref = pathlib.Path(a.reference)
  if not ref.exists():
    raise SystemExit(f"{ref}: the shared PyTorch reference is missing; pass --reference PATH")
  spec = importlib.util.spec_from_file_location("torch_unet_reference", ref)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  torch.manual_seed(0)
  model = mod.UNet([int(f) for f in a.features.split(",")]).eval()
  x = torch.randn(a.batch, 1, a.height, a.width)
  with torch.inference_mode():
    torch.sigmoid(model(x))  # warm-up
    t = time.perf_counter()
    for _ in range(a.steps):
      torch.sigmoid(model(x))
    dt = (time.perf_counter() - t) / a.steps
  print(f"torch eager U-Net forward batch={a.batch} {a.height}x{a.width}: "
        f"{dt * 1000:.0f} ms/batch, {a.batch / dt:.2f} img/s")


if __name__ == "__main__":
  main()
