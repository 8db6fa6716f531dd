"""The server at its edges: no compile at request time, bounded memory and decoding,
only TIFF/PNG/JPEG decoded, and a localhost server that answers only for itself.

Uses conftest's `calibrated_run` (the short synthetic training run, calibrated).
"""

import concurrent.futures
import contextlib
import io
import re
import statistics
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from nerveseg_jax import imageio, inference, server_process, webapp
from nerveseg_jax.data import preprocess

LOCAL = "http://localhost"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


@contextlib.contextmanager
def _count_compiles():
  """Counts XLA backend compiles, on every thread, while the block runs."""
  events: list[str] = []

  def listener(event, duration, **kwargs):  # pylint: disable=unused-argument
    if event == BACKEND_COMPILE:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def predictor(calibrated_run):
  p = inference.Predictor(calibrated_run, batch_size=2)
  p.warmup()
  return p


def _post(client, name, data, **kwargs):
  return client.post("/api/segment", files={"file": (name, data)}, **kwargs)


# --- no compile at request time -------------------------------------------------------


def test_host_resize_matches_the_training_resize():
  """preprocess.resize_host is preprocess.resize (jax.image) to float32 rounding."""
  rng = np.random.default_rng(0)
  for src, dst in (((420, 580), (64, 96)), ((97, 131), (64, 96)), ((64, 96), (420, 580)),
                   ((1100, 700), (128, 128)), ((5, 3), (64, 96)), ((64, 96), (64, 96))):
    x = rng.integers(0, 256, src).astype(np.uint8)
    want = np.asarray(preprocess.resize(jnp.asarray(x, jnp.float32)[..., None], dst))[..., 0]
    got = preprocess.resize_host(x, dst)
    assert got.shape == dst and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=5e-3)


def test_frames_of_20_sizes_compile_nothing_after_warmup(predictor):
  """predict and evaluate go through Predictor.probabilities: one program, any sizes."""
  assert predictor._jitted._cache_size() == 1   # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 256, (50 + 7 * i, 300 - 9 * i), dtype=np.uint8) for i in range(20)]
  with _count_compiles() as compiles:
    out = sorted(predictor.probabilities(frames), key=lambda t: t[0])
  assert compiles == [] and predictor._jitted._cache_size() == 1  # pylint: disable=protected-access
  assert [p.shape for _, p, _ in out] == [f.shape for f in frames]
  # Batch mates and padding do not change a frame's answer.
  alone = next(predictor.probabilities([frames[3]]))[1]
  np.testing.assert_allclose(out[3][1], alone, atol=1e-5)


def test_20_upload_sizes_cause_no_compile_and_keep_latency(predictor, smoke_run):
  frame = (smoke_run / "raw" / "test" / "1.tif").read_bytes()

  def latency(client, n=5):
    times = []
    for _ in range(n):
      start = time.perf_counter()
      assert _post(client, "1.tif", frame).status_code == 200
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  rng = np.random.default_rng(1)
  with TestClient(webapp.create_app(predictor, warmup=False), base_url=LOCAL) as c:
    before = latency(c)
    with _count_compiles() as compiles:
      for i in range(20):
        size = (40 + 13 * i, 60 + 11 * i)
        r = _post(c, f"s{i}.png", _encode(rng.integers(0, 256, size, dtype=np.uint8), "PNG"))
        assert r.status_code == 200 and (r.json()["height"], r.json()["width"]) == size
      after = latency(c)
  assert compiles == [], f"{len(compiles)} compiles at request time"
  assert after <= 2 * before, (before, after)


# --- bounded decoding -----------------------------------------------------------------


def test_a_declared_bomb_is_refused_from_its_header_with_413(predictor):
  bomb = _encode(np.zeros((4096, 4096), np.uint8), "PNG")   # 16 kB, 16.7 megapixels
  assert len(bomb) < 100_000
  with pytest.raises(imageio.ImageTooLarge, match=r"bomb\.png: image too large: 4096x4096"):
    imageio.decode_gray(bomb, "bomb.png", max_pixels=2048 * 2048)
  # Beyond Pillow's own guard, every reader (predict, evaluate, the builder) says so too.
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = 1000
  try:
    with pytest.raises(imageio.ImageTooLarge, match="bomb.png: image too large"):
      imageio.decode_gray(bomb, "bomb.png")
  finally:
    Image.MAX_IMAGE_PIXELS = old
  with TestClient(webapp.create_app(predictor, warmup=False), base_url=LOCAL) as c:
    r = _post(c, "bomb.png", bomb)
    assert r.status_code == 413, r.text
    assert "4096x4096" in r.json()["error"] and "--max_pixels" in r.json()["error"]
    assert c.get("/healthz").json()["max_pixels"] == webapp.Limits().max_pixels


def _eps() -> bytes:
  return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
          b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def test_only_tiff_png_and_jpeg_reach_a_decoder(predictor, monkeypatch):
  from PIL import BmpImagePlugin, EpsImagePlugin, GifImagePlugin
  opened = []
  for plugin, cls in ((EpsImagePlugin, "EpsImageFile"), (GifImagePlugin, "GifImageFile"),
                      (BmpImagePlugin, "BmpImageFile")):
    klass = getattr(plugin, cls)

    def spy(self, _cls=cls):
      opened.append(_cls)
      raise SyntaxError("not for this server")

    monkeypatch.setattr(klass, "_open", spy)
  monkeypatch.setattr(EpsImagePlugin, "Ghostscript",
                      lambda *a, **k: opened.append("Ghostscript"))
  gray = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
  others = {"a.eps": _eps(), "b.gif": _encode(gray, "GIF"), "c.bmp": _encode(gray, "BMP"),
            # The signature decides, not the name: a GIF called .png is still refused.
            "d.png": _encode(gray, "GIF")}
  for name, data in others.items():
    with pytest.raises(imageio.ImageReadError, match=re.escape(name)):
      imageio.decode_gray(data, name)
  with TestClient(webapp.create_app(predictor, warmup=False), base_url=LOCAL) as c:
    for name, data in others.items():
      r = _post(c, name, data)
      assert r.status_code in (415, 422) and name in r.json()["error"], (name, r.text)
    for fmt in ("PNG", "TIFF", "JPEG"):
      assert _post(c, f"ok.{fmt.lower()}", _encode(gray, fmt)).status_code == 200
  assert opened == []


def test_no_more_than_max_concurrent_requests_decode_at_once(predictor, monkeypatch):
  import uvicorn
  active, peak, lock = [0], [0], threading.Lock()
  real = imageio.decode_gray

  def slow_decode(*args, **kwargs):
    with lock:
      active[0] += 1
      peak[0] = max(peak[0], active[0])
    try:
      time.sleep(0.3)
      return real(*args, **kwargs)
    finally:
      with lock:
        active[0] -= 1

  monkeypatch.setattr(imageio, "decode_gray", slow_decode)
  app = webapp.create_app(predictor, webapp.Limits(max_concurrent=2), warmup=False)
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  try:
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
      time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    data = _encode(np.zeros((60, 80), np.uint8), "PNG")

    def upload(i):
      return httpx.post(f"{url}/api/segment", params={"images": "false"},
                        files={"file": (f"{i}.png", data)}, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      codes = list(pool.map(upload, range(8)))
  finally:
    server.should_exit = True
    thread.join(20)
  assert codes == [200] * 8
  assert peak[0] == 2, peak[0]


# --- a real server: memory, Host header, /healthz --------------------------------------


def _status_kb(pid: int, key: str) -> int:
  with open(f"/proc/{pid}/status") as f:
    return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


@pytest.fixture(scope="module")
def server(calibrated_run):
  """The CLI with its default limits on 127.0.0.1: (url, pid)."""
  with server_process.running(calibrated_run) as (url, proc):
    yield url, proc.pid


def test_8_concurrent_large_uploads_stay_under_the_documented_bound(server):
  url, pid = server
  limits = webapp.Limits()
  bound = limits.max_concurrent * webapp.peak_request_bytes(limits.max_pixels)

  def peak_growth(files: list[tuple[str, bytes]]) -> tuple[list[int], int]:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
      f.write("5")   # resets the peak (VmHWM) to the current RSS
    base = _status_kb(pid, "VmRSS") * 1024

    def upload(item):
      with httpx.Client(timeout=httpx.Timeout(300, connect=10)) as c:
        return c.post(f"{url}/api/segment", files={"file": item}).status_code

    with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
      codes = list(pool.map(upload, files))
    return codes, _status_kb(pid, "VmHWM") * 1024 - base

  # 16 kB files that declare 4096x4096: refused from the header, nothing decoded.
  bomb = _encode(np.zeros((4096, 4096), np.uint8), "PNG")
  codes, growth = peak_growth([(f"bomb{i}.png", bomb) for i in range(8)])
  assert codes == [413] * 8
  assert growth < 64 * 2**20, growth / 2**20
  # At the largest accepted size, all answered (with images), within the bound.
  side = int(limits.max_pixels ** 0.5)
  big = _encode(np.zeros((side, side), np.uint8), "PNG")
  codes, growth = peak_growth([(f"big{i}.png", big) for i in range(8)])
  assert codes == [200] * 8
  assert growth < bound, (growth / 2**20, bound / 2**20)


def test_a_localhost_server_answers_only_localhost_names(server, predictor):
  url, _ = server
  port = url.rsplit(":", 1)[1]
  assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
  for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
    assert httpx.get(f"{url}/healthz", headers={"Host": host}, timeout=10).status_code == 200
  for host in (f"attacker.example:{port}", "localhost.attacker.example", "127.0.0.1.nip.io"):
    r = httpx.get(f"{url}/healthz", headers={"Host": host}, timeout=10)
    assert r.status_code == 400 and "localhost" in r.json()["error"], (host, r.text)
    r = httpx.post(f"{url}/api/segment", headers={"Host": host}, timeout=10,
                   files={"file": ("a.png", _encode(np.zeros((8, 8), np.uint8), "PNG"))})
    assert r.status_code == 400, host
  # IPv6 loopback, and an app made for a server bound beyond localhost (behind a proxy).
  with TestClient(webapp.create_app(predictor, warmup=False), base_url="http://[::1]:80") as c:
    assert c.get("/healthz").status_code == 200
  with TestClient(webapp.create_app(predictor, warmup=False, allowed_hosts=None),
                  base_url="http://scanner.hospital.example") as c:
    assert c.get("/healthz").status_code == 200


def test_healthz_shows_no_absolute_paths(server, calibrated_run):
  url, _ = server
  r = httpx.get(f"{url}/healthz", timeout=10)
  assert r.status_code == 200
  assert r.json()["workdirs"] == [calibrated_run.name]
  assert str(calibrated_run.parent) not in r.text
  assert not re.search(r'"/[^"]', r.text), r.text   # no string value starts with "/"
