#!/usr/bin/env python3
"""The page's latency on CPU: full-frame requests through POST /api/segment.

The default U-Net (configs/unet.py, 128x176 input) with random weights (speed does not
depend on them) is saved as a run in a temporary folder. A 420x580 frame, the Kaggle
size, is posted N times with images (the page's request): decode, resize to the
network's input, network, resize back, post-processing, RLE and the PNGs. Prints p50
and p95, in process (FastAPI TestClient) and over HTTP (the serve CLI on 127.0.0.1 in a
subprocess, timed from this one), and the CPU it ran on (docs/serve.md). --stages adds
the median of each stage of the same work, timed one by one in process, without HTTP.

Usage, from the repository root:
  python docs/bench/serve_latency.py [--requests 50] [--batch_size 1] [--stages]
"""
import argparse
import io
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np


def _frame_png() -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # Speckle-like texture (smoothed noise) rather than flat grey, so PNG encoding costs
  # what a real frame's does.
  noise = rng.normal(100, 40, (105, 145))
  frame = np.clip(np.kron(noise, np.ones((4, 4))) + rng.normal(0, 8, (420, 580)), 0, 255)
  buffer = io.BytesIO()
  Image.fromarray(frame.astype(np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def _percentiles(times: list[float]) -> str:
  ms = sorted(t * 1e3 for t in times)
  p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
  return f"p50 {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms (n={len(ms)})"


def _cpu_seconds(pid: int | None = None) -> float:
  """CPU time (user + system, all threads) of this process, or of process `pid`."""
  if pid is None:
    return time.process_time()
  fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _time(post, n: int, warm: int = 3, pid: int | None = None) -> list[float]:
  """Wall times of n posts; prints the server's CPU time per request beside them.

  CPU time is less inflated than wall time when other jobs share the machine: with
  the cores to itself a request takes at least CPU / cores and at most CPU.
  """
  for _ in range(warm):
    post()
  times = []
  cpu = _cpu_seconds(pid)
  for _ in range(n):
    start = time.perf_counter()
    post()
    times.append(time.perf_counter() - start)
  cpu = (_cpu_seconds(pid) - cpu) / n
  print(f"  CPU time per request ({'this process' if pid is None else 'the server'}): "
        f"{cpu * 1e3:.1f} ms")
  return times


def in_process(workdir: pathlib.Path, data: bytes, n: int, batch_size: int) -> list[float]:
  from fastapi.testclient import TestClient  # pylint: disable=g-import-not-at-top
  from nerveseg_jax import inference, webapp  # pylint: disable=g-import-not-at-top
  app = webapp.create_app(lambda: inference.Predictor(workdir, batch_size=batch_size,
                                                      which="latest"))
  with TestClient(app, base_url="http://localhost") as client:
    while client.get("/healthz").status_code != 200:
      time.sleep(0.1)

    def post():
      r = client.post("/api/segment", files={"file": ("frame.png", data)})
      assert r.status_code == 200, r.text

    return _time(post, n)


def over_http(workdir: pathlib.Path, data: bytes, n: int, batch_size: int) -> list[float]:
  import httpx  # pylint: disable=g-import-not-at-top
  from nerveseg_jax import server_process  # pylint: disable=g-import-not-at-top
  with server_process.running(workdir, "--which", "latest", "--batch_size", str(batch_size),
                              timeout=600) as (url, proc):
    with httpx.Client(base_url=url, timeout=120) as client:

      def post():
        r = client.post("/api/segment", files={"file": ("frame.png", data)})
        assert r.status_code == 200, r.text

      return _time(post, n, pid=proc.pid)


def stages(workdir: pathlib.Path, data: bytes, n: int, batch_size: int) -> None:
  """Prints the median of each stage of a request's work, timed one after another."""
  import jax  # pylint: disable=g-import-not-at-top
  from nerveseg_jax import inference, postprocess, webapp  # pylint: disable=g-import-not-at-top
  predictor = inference.Predictor(workdir, batch_size=batch_size, which="latest")
  predictor.warmup()
  limits = webapp.Limits()
  size = predictor.input_sizes[0]
  times: dict[str, list[float]] = {}

  def timed(stage, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    times.setdefault(stage, []).append(time.perf_counter() - start)
    return out

  def network(small):
    batch = np.zeros((batch_size, *size, 1), np.uint8)
    batch[0, ..., 0] = small
    probs, presence = predictor._jitted(  # pylint: disable=protected-access
        predictor._states, (jax.device_put(batch, predictor._batch_sharding),))  # pylint: disable=protected-access
    return np.asarray(probs[0])[0], float(np.asarray(presence)[0])

  def post(prob, presence):
    d = postprocess.apply(prob, presence, predictor.calibration)
    return inference.FramePrediction("frame", d.mask, presence, d.decision, d.area, d.bbox)

  for i in range(n + 3):
    if i == 3:
      times.clear()  # the first requests warm caches
    frame = timed("decode", webapp._decode, data, "frame.png", limits)  # pylint: disable=protected-access
    small = timed("resize to the network's input", inference._resize_frame, frame, size)  # pylint: disable=protected-access
    prob, presence = timed("network (jitted, batch incl. transfers)", network, small)
    prob = timed("resize back to the frame", inference._resize_prob, prob, frame.shape)  # pylint: disable=protected-access
    result = timed("post-processing", post, prob, presence)
    timed("answer: RLE, PNGs, JSON", lambda: webapp.JSONResponse(
        webapp._payload(frame, result, "frame.png", True)))  # pylint: disable=protected-access
  total = sum(statistics.median(v) for v in times.values())
  print(f"stages, in process, medians of {n} (sum {total * 1e3:.1f} ms):")
  for stage, v in times.items():
    m = statistics.median(v)
    print(f"  {stage:40s} {m * 1e3:7.1f} ms  {100 * m / total:4.0f} %")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--requests", type=int, default=50)
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--stages", action="store_true",
                      help="also time each stage of the work in process")
  args = parser.parse_args()
  # Before anything here starts JAX (saving the run does): the in-process figures must
  # run with the flags the serve CLI sets, or they time slower convolutions.
  from nerveseg_jax import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.configure()
  data = _frame_png()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / "unet_random"
    workdir.mkdir()
    from nerveseg_jax import trainer  # pylint: disable=g-import-not-at-top
    from nerveseg_jax.configs import unet  # pylint: disable=g-import-not-at-top
    trainer.save_untrained(unet.get_config(), workdir)
    from nerveseg_jax import hostinfo  # pylint: disable=g-import-not-at-top
    print(f"host: {hostinfo.describe(hostinfo.cpu())}; load average "
          f"{os.getloadavg()[0]:.1f}")
    if args.stages:
      stages(workdir, data, args.requests, args.batch_size)
    print(f"in process (TestClient): {_percentiles(in_process(workdir, data, args.requests, args.batch_size))}")
    print(f"over HTTP (uvicorn, 127.0.0.1): {_percentiles(over_http(workdir, data, args.requests, args.batch_size))}")


if __name__ == "__main__":
  main()
