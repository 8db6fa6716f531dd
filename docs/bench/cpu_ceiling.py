#!/usr/bin/env python3
"""The figures docs/performance.md sets beside the PyTorch comparison, on this host.

  1. the fp32 ceiling: a jitted 2048x2048 matmul, GFLOP/s (best and median of 10);
  2. the torch_reference U-Net's forward: XLA's cost analysis (GFLOP per image) and
     images/s at batch 16, 128x128 (median of N, default 6);
  3. traced model construction: nnx.eval_shape of Inception-ResNetV2 and the U-Net, s.

Usage, from the repository root:
  python docs/bench/cpu_ceiling.py
  NERVESEG_NO_XLA_FLAGS=1 python docs/bench/cpu_ceiling.py   # without xla_flags.py's flag
"""
import os
import statistics
import sys
import time

import jax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from nerveseg_jax import models, xla_flags  # noqa: E402
from nerveseg_jax.models.unet import UNet  # noqa: E402

# Importing the package sets no flags; before JAX starts its backend, this does (and
# NERVESEG_NO_XLA_FLAGS=1 makes it a no-op, for the comparison without them).
xla_flags.configure()


def _times(fn, n: int) -> list[float]:
  fn()  # compile and warm up
  out = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def main() -> None:
  n_rounds = int(os.environ.get("N", 6))
  print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
  size = 2048
  a = jax.random.normal(jax.random.key(0), (size, size))
  b = jax.random.normal(jax.random.key(1), (size, size))
  matmul = jax.jit(lambda a, b: a @ b)
  ts = _times(lambda: matmul(a, b).block_until_ready(), 10)
  flop = 2 * size**3
  print(f"fp32 matmul {size}: best {flop / min(ts) / 1e9:.1f} GFLOP/s, "
        f"median {flop / statistics.median(ts) / 1e9:.1f}")

  model = UNet(features=32, depth=4, norm="none", presence_head=False, rngs=nnx.Rngs(0))
  model.eval()
  graph, state = nnx.split(model)
  forward = jax.jit(lambda s, x: jax.nn.sigmoid(nnx.merge(graph, s)(x)[0]))
  x = jax.random.normal(jax.random.key(0), (16, 128, 128, 1))
  cost = forward.lower(state, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ts = _times(lambda: forward(state, x).block_until_ready(), n_rounds)
  print(f"U-Net forward: {cost['flops'] / 16 / 1e9:.2f} GFLOP/image (XLA cost analysis), "
        f"median {16 / statistics.median(ts):.2f} images/s, best {16 / min(ts):.2f}")

  for name in ("inception_resnet_v2", "unet"):
    t = time.perf_counter()
    nnx.eval_shape(lambda name=name: models.build_model({"name": name}, rngs=nnx.Rngs(0)))
    print(f"nnx.eval_shape of {name}: {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
  main()
