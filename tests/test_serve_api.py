"""The web app's API: results, bad input, readiness, and a real server under load.

Uses conftest's session-wide `calibrated_run` (a short synthetic training run,
calibrated), so the nerve frames of its synthetic test split are found.
"""

import base64
import concurrent.futures
import csv
import io
import pathlib
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from nerveseg_jax import imageio, inference, rle, serve, server_process, webapp

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL = "http://localhost"   # the app answers only to localhost names by default


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _test_frames(raw: pathlib.Path) -> list[tuple[str, bool]]:
  """(file name, has a nerve) of the synthetic test frames, from the hidden truth."""
  with open(raw / "test_truth.csv", newline="") as f:
    return [(f"{row['img']}.tif", bool(row["pixels"].strip())) for row in csv.DictReader(f)]


def _png_array(b64: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def predictor(calibrated_run):
  return inference.Predictor(calibrated_run, batch_size=2)


@pytest.fixture(scope="module")
def client(predictor):
  with TestClient(webapp.create_app(predictor), base_url=LOCAL) as c:
    _wait_ready(c)
    yield c


def _wait_ready(client, timeout=120.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    r = client.get("/healthz")
    if r.status_code == 200:
      return r.json()
    assert r.status_code == 503 and r.json()["status"] == "loading", r.text
    time.sleep(0.1)
  raise AssertionError("the app never became ready")


def _post(client, name: str, data: bytes, **kwargs):
  return client.post("/api/segment", files={"file": (name, data)}, **kwargs)


def test_good_frames_give_the_predictors_results(client, predictor, smoke_run):
  raw = smoke_run / "raw"
  frames = _test_frames(raw)
  nerve = next(name for name, has in frames if has)
  empty = next(name for name, has in frames if not has)
  for name in (nerve, empty):
    data = (raw / "test" / name).read_bytes()
    r = _post(client, name, data)
    assert r.status_code == 200, r.text
    body = r.json()
    frame = imageio.decode_gray(data, name)
    want = predictor.predict([frame], [name[:-4]])[0]
    assert body["name"] == name[:-4] and body["filename"] == name
    assert (body["height"], body["width"]) == frame.shape
    assert body["nerve_found"] is body["decision"] is want.decision
    assert body["message"] == want.message
    assert body["presence"] == pytest.approx(want.presence, abs=1e-5)
    assert body["area"] == want.area
    mask = rle.decode(body["rle"], *frame.shape)
    np.testing.assert_array_equal(mask, want.mask)
    assert int(mask.sum()) == body["area"]
    if want.decision:
      x0, y0, x1, y1 = body["bbox"]
      ys, xs = np.nonzero(mask)
      assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    else:
      assert body["message"] == "No nerve found" and body["bbox"] is None and body["rle"] == ""
    # The page's images: the frame as read (browsers cannot show TIFF) and the 0/255
    # mask, from which the page draws the overlay; the overlay itself on request.
    assert sorted(body["images"]) == ["mask", "original"]
    np.testing.assert_array_equal(_png_array(body["images"]["original"]), frame)
    np.testing.assert_array_equal(_png_array(body["images"]["mask"]), want.mask * 255)
    with_overlay = _post(client, name, data, params={"overlay": "true"}).json()
    assert sorted(with_overlay["images"]) == ["mask", "original", "overlay"]
    overlay = _png_array(with_overlay["images"]["overlay"])
    np.testing.assert_array_equal(overlay, imageio.overlay(frame, want.mask))
    assert (overlay != frame[..., None]).any() == want.decision
    assert _post(client, name, data, params={"images": "false", "overlay": "true"}
                 ).json().keys() == body.keys() - {"images"}
  # The synthetic nerve frame is found by the calibrated smoke run.
  assert _post(client, nerve, (raw / "test" / nerve).read_bytes()).json()["nerve_found"]


def test_any_format_size_and_channels(client, predictor):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (120, 150), dtype=np.uint8)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  want = predictor.predict([gray], ["x"])[0]
  for name, data in (("a.png", _encode(gray, "PNG")), ("b.tif", _encode(gray, "TIFF")),
                     ("c.png", _encode(rgb, "PNG"))):
    body = _post(client, name, data, params={"images": "false"}).json()
    assert (body["height"], body["width"]) == (120, 150), body
    assert "images" not in body
    assert body["presence"] == pytest.approx(want.presence, abs=1e-5)
    assert body["rle"] == want.rle()
  body = _post(client, "d.jpg", _encode(rgb, "JPEG")).json()
  assert (body["height"], body["width"]) == (120, 150) and "rle" in body
  # Names from other clients may carry a path; only the file's own name is kept.
  assert _post(client, "C:\\scans\\7.png", _encode(gray, "PNG")).json()["name"] == "7"


def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(client, smoke_run):
  good = _encode(np.zeros((60, 80), np.uint8), "PNG")
  cases = [
      ("notes.txt", b"this is not an image", 422, r"notes\.txt: not a recognised image"),
      ("empty.png", b"", 422, r"empty\.png: empty file"),
      ("cut.png", good[:len(good) // 2], 422, r"cut\.png: .*corrupt"),
  ]
  tif = (smoke_run / "raw" / "test" / "1.tif").read_bytes()
  cases.append(("cut.tif", tif[:len(tif) // 3], 422, r"cut\.tif"))
  for name, data, status, pattern in cases:
    r = _post(client, name, data)
    assert r.status_code == status, (name, r.text)
    assert re.search(pattern, r.json()["error"]), (name, r.json())
  r = client.post("/api/segment", files={"image": ("a.png", good)})
  assert r.status_code == 400 and "field 'file'" in r.json()["error"]
  r = client.post("/api/segment", content=good, headers={"content-type": "image/png"})
  assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
  r = client.get("/api/segment")
  assert r.status_code == 405 and "error" in r.json()
  assert client.get("/nothing-here").json() == {"error": "not found"}
  assert _post(client, "ok.png", good).status_code == 200


def test_size_and_pixel_limits(predictor):
  limits = webapp.Limits(max_upload_bytes=100_000, max_pixels=300 * 300)
  with TestClient(webapp.create_app(predictor, limits, warmup=False), base_url=LOCAL) as c:
    _wait_ready(c)
    assert c.get("/healthz").json()["max_upload_bytes"] == 100_000
    noise = np.random.default_rng(1).integers(0, 256, (250, 250), dtype=np.uint8)
    big = _encode(np.tile(noise, (2, 2)), "PNG")     # 500x500 noise: ~250 kB
    assert len(big) > 100_000
    r = _post(c, "big.png", big)
    assert r.status_code == 413 and "--max_upload_mb" in r.json()["error"], r.text
    # Just over the limit, within the multipart slack: caught on the bytes read.
    r = _post(c, "edge.png", big[:100_001])
    assert r.status_code == 413 and "edge.png: file too large" in r.json()["error"], r.text
    # Few bytes, many pixels (a decompression bomb in miniature): refused from the header.
    bomb = _encode(np.zeros((400, 400), np.uint8), "PNG")
    assert len(bomb) < 100_000
    r = _post(c, "bomb.png", bomb)
    assert r.status_code == 413 and "400x400" in r.json()["error"] and "--max_pixels" in (
        r.json()["error"])
    assert _post(c, "ok.png", _encode(noise, "PNG")).status_code == 200


def test_healthz_is_503_while_loading_then_200(predictor):
  release = threading.Event()

  def slow_load():
    release.wait(30)
    return predictor

  with TestClient(webapp.create_app(slow_load, warmup=False), base_url=LOCAL) as c:
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = _post(c, "a.png", _encode(np.zeros((8, 8), np.uint8), "PNG"))
    assert r.status_code == 503 and "loading" in r.json()["error"]
    assert c.get("/").status_code == 200  # the page shows its own "loading" state
    release.set()
    body = _wait_ready(c, timeout=30)
    assert body["status"] == "ready" and body["workdirs"] == [predictor.workdirs[0].name]
    assert body["calibration"] == predictor.calibration.to_dict()


def test_runs_load_once_and_inference_compiles_once(calibrated_run, smoke_run):
  """Ready means compiled: frames of the warm-up size never compile again."""
  calls = []

  def load():
    calls.append(1)
    return inference.Predictor(calibrated_run, batch_size=2)

  with TestClient(webapp.create_app(load), base_url=LOCAL) as c:
    _wait_ready(c)
    p = c.app.state.worker.predictor
    assert p._jitted._cache_size() == 1   # pylint: disable=protected-access
    for name in ("1.tif", "2.tif", "3.tif"):
      r = _post(c, name, (smoke_run / "raw" / "test" / name).read_bytes(),
                params={"images": "false"})
      assert r.status_code == 200, r.text
    assert p._jitted._cache_size() == 1   # pylint: disable=protected-access
    assert calls == [1]


def test_healthz_reports_a_failed_load(tmp_path):
  def broken():
    return inference.Predictor(tmp_path)  # no config.json

  with TestClient(webapp.create_app(broken), base_url=LOCAL) as c:
    deadline = time.monotonic() + 30
    while c.get("/healthz").json()["status"] == "loading" and time.monotonic() < deadline:
      time.sleep(0.05)
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "error"
    # The run is named, the server's path is not.
    assert tmp_path.name in r.json()["error"] and str(tmp_path) not in r.json()["error"]
    r = _post(c, "a.png", _encode(np.zeros((8, 8), np.uint8), "PNG"))
    assert r.status_code == 503 and "failed to load" in r.json()["error"]


def test_page_assets_are_local(client):
  html = client.get("/")
  assert html.status_code == 200 and "text/html" in html.headers["content-type"]
  assert "default-src 'self'" in html.headers["content-security-policy"]
  for src in re.findall(r'(?:src|href)="([^"]+)"', html.text):
    assert src.startswith("/static/"), src
    assert client.get(src).status_code == 200
  for name in ("index.html", "app.js", "style.css"):
    text = (REPO / "nerveseg_jax" / "static" / name).read_text()
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name


def test_cli_rejects_bad_arguments(tmp_path, capsys):
  assert serve.main(["--workdir", str(tmp_path)]) == 2
  assert f"--workdir {tmp_path}: no config.json" in capsys.readouterr().err
  assert serve.main(["--workdir", str(tmp_path), "--port", "70000"]) == 2
  assert "--port must be in 0..65535" in capsys.readouterr().err
  assert serve.main(["--workdir", str(tmp_path), "--max_upload_mb", "0"]) == 2
  assert "--max_upload_mb must be > 0" in capsys.readouterr().err
  # A workdir that cannot be loaded: the server says why and stops, status 1. (In a
  # subprocess: uvicorn configures process-wide logging and signal handlers.)
  (tmp_path / "config.json").write_text("{}")
  done = subprocess.run([sys.executable, "-m", "nerveseg_jax.serve", "--workdir",
                         str(tmp_path), "--port", "0"], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 1, done.stderr
  assert "loading the runs failed" in done.stderr and "ready on" not in done.stdout


def test_real_server_answers_20_concurrent_requests(calibrated_run, smoke_run):
  """The CLI end to end: start, say ready, answer 20 uploads at once (plus 2 bad ones)."""
  raw = smoke_run / "raw"
  names = [name for name, _ in _test_frames(raw)][:20]
  assert len(names) == 20
  with server_process.running(calibrated_run, "--batch_size", "4") as (url, _):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url   # localhost by default
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["batch_size"] == 4

    def upload(name: str, data: bytes) -> httpx.Response:
      with httpx.Client(base_url=url, timeout=httpx.Timeout(120, connect=10)) as c:
        return c.post("/api/segment", params={"images": "false"},
                      files={"file": (name, data)})

    files = [(n, (raw / "test" / n).read_bytes()) for n in names]
    alone = {n: upload(n, d).json() for n, d in files[:3]}   # the reference, one by one
    bad = [("bad1.txt", b"not an image"), ("bad2.png", b"\x89PNG\r\n\x1a\n broken")]
    with concurrent.futures.ThreadPoolExecutor(len(files) + len(bad)) as pool:
      futures = {pool.submit(upload, n, d): n for n, d in files + bad}
      answers = {futures[f]: f.result() for f in concurrent.futures.as_completed(futures)}
    for n, _ in bad:
      assert answers[n].status_code == 422 and n in answers[n].json()["error"]
    for n, _ in files:
      r = answers[n]
      assert r.status_code == 200, (n, r.text)
      body = r.json()
      assert body["name"] == n[:-4] and (body["height"], body["width"]) == (420, 580)
      assert int(rle.decode(body["rle"]).sum()) == body["area"]
    for n, ref in alone.items():  # a frame's answer does not depend on its batch mates
      body = answers[n].json()
      assert body["decision"] == ref["decision"]
      assert body["presence"] == pytest.approx(ref["presence"], abs=1e-4)
      diff = np.count_nonzero(rle.decode(body["rle"]) != rle.decode(ref["rle"]))
      assert diff <= 10, (n, diff)
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
