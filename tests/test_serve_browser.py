"""The clinician's page in a real browser: Debian's chromium driven by Playwright.

Never downloads a browser: Playwright is pointed at /usr/bin/chromium (installed by
.ci/run). Skipped, with the reason, where either is missing. The screenshot is saved
to the test's tmp dir and, when NERVESEG_ARTIFACTS is set, to that folder.
"""

import csv
import dataclasses
import io
import os
import pathlib
import shutil
import threading
import time
import types

import httpx
import numpy as np
import pytest

from nerveseg_jax import imageio, inference, rle, webapp

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

LIMIT_BYTES = 1024 * 1024
LIMIT_PIXELS = 600 * 600

if not CHROMIUM.exists():
  pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)",
              allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is missing (pip install playwright)")


@pytest.fixture(scope="module")
def server(calibrated_run):
  """A real uvicorn server on a free port, in a thread, with the calibrated smoke run."""
  import uvicorn
  # Limits small enough to test (a Kaggle frame, 420x580 and ~240 kB, still fits).
  app = webapp.create_app(lambda: inference.Predictor(calibrated_run, batch_size=1),
                          webapp.Limits(max_upload_bytes=LIMIT_BYTES, max_pixels=LIMIT_PIXELS))
  # log_config=None: leave process-wide logging (and pytest's capture) alone.
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 120
  while not (server.started and app.state.worker.done.is_set()):
    assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
    time.sleep(0.05)
  assert app.state.worker.state == "ready", app.state.worker.error
  port = server.servers[0].sockets[0].getsockname()[1]
  yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", app=app)
  server.should_exit = True
  thread.join(15)


@pytest.fixture(scope="module")
def server_url(server):
  return server.url


@pytest.fixture(scope="module")
def browser():
  with sync_api.sync_playwright() as p:
    b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


@pytest.fixture
def page(browser, server_url):
  context = browser.new_context(viewport={"width": 1280, "height": 900},
                                accept_downloads=True)
  page = context.new_page()
  requests: list[str] = []
  page.on("request", lambda r: requests.append(r.url))
  page.goto(server_url)
  page.wait_for_selector("#status.status-ready", timeout=60_000)
  yield page
  # Works offline: nothing but this server, data: and blob: URLs was ever requested.
  outside = [u for u in requests
             if not u.startswith((server_url, "data:", "blob:"))]
  assert not outside, outside
  context.close()


def _save_artifact(page, tmp_path: pathlib.Path, name: str) -> pathlib.Path:
  path = tmp_path / name
  page.screenshot(path=str(path), full_page=True)
  artifacts = os.environ.get("NERVESEG_ARTIFACTS")
  if artifacts:
    pathlib.Path(artifacts).mkdir(parents=True, exist_ok=True)
    shutil.copy(path, pathlib.Path(artifacts) / name)
  return path


def test_upload_shows_overlay_decision_and_downloads(page, server_url, smoke_run, tmp_path):
  raw = smoke_run / "raw"
  with open(raw / "test_truth.csv", newline="") as f:
    truth = {row["img"]: row["pixels"].strip() for row in csv.DictReader(f)}
  nerve = next(name for name, pixels in truth.items() if pixels)
  empty = next(name for name, pixels in truth.items() if not pixels)
  notes = tmp_path / "notes.txt"
  notes.write_text("a clinician's note, not an image")
  page.set_input_files("#file-input", [str(raw / "test" / f"{nerve}.tif"),
                                       str(raw / "test" / f"{empty}.tif"), str(notes)])
  sync_api.expect(page.locator("#results .card.pending")).to_have_count(0, timeout=60_000)
  cards = page.locator("#results .card")
  assert cards.count() == 3

  found = cards.nth(0)
  assert found.locator(".filename").inner_text() == f"{nerve}.tif"
  assert "found" in found.get_attribute("class").split()
  assert found.locator(".badge").inner_text() == "Nerve found"
  for img in ("img.original", "img.overlay"):  # decoded PNGs, at the frame's size
    assert found.locator(img).evaluate("i => i.complete && i.naturalWidth") == 580
  assert found.locator(".presence").inner_text().endswith("%")
  # The calibrated cut-off is marked; when it is 0 the page says the mask area decides.
  cal = httpx.get(f"{server_url}/healthz").json()["calibration"]
  cut = cal["presence_threshold"]
  threshold = found.locator(".threshold")
  if cut > 0:
    assert threshold.inner_text() == f"threshold {100 * cut:.1f}\u00a0%"
  elif cal["min_area"] > 0:
    assert threshold.inner_text() == (
        f"not used: decided by mask area \u2265 {cal['min_area']:,} px")
  else:
    assert threshold.inner_text() == "not used: decided by the mask"
  assert "px" in found.locator(".area").inner_text()

  none = cards.nth(1)
  assert none.locator(".badge").inner_text() == "No nerve found"
  assert none.locator(".area").inner_text() == "0 px"
  assert none.locator(".area-note").inner_text() == "no nerve found"

  # The non-image: the server never saw it (the page checks the type) and it is
  # reported on its own card, the others processed.
  bad = cards.nth(2)
  assert "failed" in bad.get_attribute("class").split()
  assert "notes.txt" in bad.locator(".error").inner_text()
  assert "1 could not be analysed" in page.locator("#summary").inner_text()
  _save_artifact(page, tmp_path, "serve_page.png")

  with page.expect_download() as info:
    found.locator(".download-mask").click()
  download = info.value
  assert download.suggested_filename == f"{nerve}_mask.png"
  from PIL import Image
  mask = np.asarray(Image.open(download.path()))
  assert mask.shape == (420, 580) and set(np.unique(mask)) <= {0, 255} and mask.any()
  # The page draws the overlay from the frame and the mask: the server's pixels exactly.
  frame = imageio.read_gray(raw / "test" / f"{nerve}.tif")
  np.testing.assert_array_equal(_img_pixels(found.locator("img.overlay")),
                                imageio.overlay(frame, mask))

  with page.expect_download() as info:
    page.click("#download-csv")
  rows = list(csv.reader(io.StringIO(pathlib.Path(info.value.path()).read_text())))
  assert rows[0] == ["img", "pixels"]
  assert sorted(r[0] for r in rows[1:]) == sorted([nerve, empty])
  by_name = dict(rows[1:])
  assert by_name[empty] == ""
  np.testing.assert_array_equal(rle.decode(by_name[nerve]), mask // 255)

  # Unticking a frame leaves it out of the CSV.
  none.locator("input.select").uncheck()
  with page.expect_download() as info:
    page.click("#download-csv")
  rows = list(csv.reader(io.StringIO(pathlib.Path(info.value.path()).read_text())))
  assert [r[0] for r in rows[1:]] == [nerve]


def _img_pixels(locator) -> np.ndarray:
  """An <img>'s decoded RGB pixels, read back through a canvas as a lossless PNG."""
  import base64
  from PIL import Image
  url = locator.evaluate("""(i) => {
    const c = document.createElement("canvas");
    c.width = i.naturalWidth; c.height = i.naturalHeight;
    c.getContext("2d").drawImage(i, 0, 0);
    return c.toDataURL("image/png");
  }""")
  data = base64.b64decode(url.split(",", 1)[1])
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_page_overlay_is_the_servers_at_any_frame_size(page, server, tmp_path):
  """The outline thickens with the frame as imageio.overlay's does, rounded as Python
  rounds (750 / 300 = 2.5 -> 2, 1050 / 300 = 3.5 -> 4), and follows masks that touch
  the frame's edge; the tint inside is the same integer arithmetic."""
  from PIL import Image
  predictor = server.app.state.worker.predictor
  rng = np.random.default_rng(3)
  masks = {}

  def fake_predict_each(frames, names):
    out = []
    for frame, name in zip(frames, names):
      mask = masks[frame.shape]
      ys, xs = np.nonzero(mask)
      out.append(inference.FramePrediction(
          name, mask, 0.9, True, int(mask.sum()),
          (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return out

  files, frames = [], {}
  for shape in ((300, 750), (200, 150), (330, 1050)):
    frame = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros(shape, np.uint8)
    mask[: shape[0] // 2, shape[1] // 3:] = 1      # touches the top and right edges
    mask[shape[0] - 30:shape[0] - 10, 5:40] = 1    # a small blob near the bottom left
    mask[shape[0] // 2 + 5, 3] = 1                 # one pixel
    masks[shape] = mask
    path = tmp_path / f"{shape[1]}x{shape[0]}.png"
    Image.fromarray(frame).save(path)
    files.append(str(path))
    frames[path.name] = frame
  predictor.predict_each = fake_predict_each
  try:
    page.set_input_files("#file-input", files)
    sync_api.expect(page.locator("#results .card.pending")).to_have_count(0, timeout=60_000)
  finally:
    del predictor.predict_each
  cards = page.locator("#results .card")
  assert cards.count() == len(files)
  for i in range(cards.count()):
    card = cards.nth(i)
    frame = frames[card.locator(".filename").inner_text()]
    np.testing.assert_array_equal(_img_pixels(card.locator("img.overlay")),
                                  imageio.overlay(frame, masks[frame.shape]))


def test_server_side_errors_appear_on_the_page(page, tmp_path):
  """Files that look like images by name but are not: the server's 4xx message shows."""
  fake = tmp_path / "scan.png"
  fake.write_bytes(b"this is not a PNG")
  cut = tmp_path / "cut.tif"
  cut.write_bytes(b"II*\x00" + b"\x00" * 20)
  page.set_input_files("#file-input", [str(fake), str(cut)])
  sync_api.expect(page.locator("#results .card.failed")).to_have_count(2, timeout=60_000)
  errors = page.locator("#results .card .error").all_inner_texts()
  assert any("scan.png: not a recognised image" in e for e in errors), errors
  assert any("cut.tif" in e for e in errors), errors
  assert page.locator("#download-csv").is_disabled()
  _save_artifact(page, tmp_path, "serve_page_errors.png")


def _drop(page, files: list[tuple[str, bytes, str]]) -> None:
  """Drops files on the drop zone, as a drag from the desktop does (a real DataTransfer)."""
  import base64
  payload = [[name, base64.b64encode(data).decode("ascii"), mime] for name, data, mime in files]
  transfer = page.evaluate_handle("""(files) => {
    const dt = new DataTransfer();
    for (const [name, b64, type] of files) {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      dt.items.add(new File([bytes], name, {type}));
    }
    return dt;
  }""", payload)
  page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": transfer})
  page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})


def test_dropped_files_and_size_limits_each_get_their_own_card(page, smoke_run, tmp_path):
  """Drag and drop; a file over the size limit and an image over the pixel limit are
  reported on their own cards, and the good frame dropped with them is still analysed."""
  from PIL import Image
  raw = smoke_run / "raw"
  assert page.locator("#limit-mb").inner_text() == "1"      # the server's limit, shown
  frame = (raw / "test" / "1.tif").read_bytes()
  big = np.random.default_rng(0).integers(0, 256, LIMIT_BYTES + 500_000, dtype=np.uint8)
  wide = io.BytesIO()
  Image.fromarray(np.zeros((700, 700), np.uint8)).save(wide, format="PNG")  # few bytes
  _drop(page, [("1.tif", frame, "image/tiff"), ("big.png", big.tobytes(), "image/png"),
               ("wide.png", wide.getvalue(), "image/png")])
  sync_api.expect(page.locator("#results .card.pending")).to_have_count(0, timeout=60_000)
  cards = page.locator("#results .card")
  assert cards.count() == 3
  good = cards.nth(0)
  assert "done" in good.get_attribute("class").split()
  assert good.locator(".badge").inner_text() in ("Nerve found", "No nerve found")
  assert good.locator("img.overlay").evaluate("i => i.complete && i.naturalWidth") == 580
  big_error = cards.nth(1).locator(".error").inner_text()
  assert "big.png: file too large" in big_error and "the limit is 1 MB" in big_error
  wide_error = cards.nth(2).locator(".error").inner_text()
  assert "wide.png: image too large: 700x700" in wide_error, wide_error
  assert "2 could not be analysed" in page.locator("#summary").inner_text()
  assert page.locator("#download-csv").inner_text() == "Download CSV (1)"
  _save_artifact(page, tmp_path, "serve_page_limits.png")


def _wait_card(page):
  sync_api.expect(page.locator("#results .card.pending")).to_have_count(0, timeout=60_000)
  return page.locator("#results .card").last


def test_real_frame_names_the_model_flags_uncertainty_and_enlarges(page, server, shared_data,
                                                                  calibrated_run, tmp_path):
  """A real Kaggle frame: the header names the model; a presence near the threshold
  reads "Uncertain" beside the decision; a click opens the frame large with an
  outline-opacity control."""
  frame = shared_data / "kaggle_subjects_1_2" / "train" / "1_1.tif"
  with open(frame, "rb") as f:
    presence = httpx.post(f"{server.url}/api/segment?images=false",
                          files={"file": (frame.name, f)}).json()["presence"]
  health = httpx.get(f"{server.url}/healthz").json()
  margin = health["uncertain_margin"]
  info = health["model"]
  line = page.locator("#model-line").inner_text()
  assert line.startswith(f"Model {calibrated_run.name} · checkpoint step {info['step']} · ")
  assert f"validation Kaggle score {info['kaggle_score']:.3f}" in line
  assert f"nerve-frame Dice {info['nerve_dice']:.3f}" in line
  assert f"thresholds calibrated {info['calibrated_at']}" in line

  predictor = server.app.state.worker.predictor
  saved = predictor.calibration
  try:
    # A model whose threshold lies half a margin from this frame's presence.
    near = presence + margin / 2 if presence < 0.5 else presence - margin / 2
    predictor.calibration = dataclasses.replace(saved, presence_threshold=near)
    page.reload()
    page.wait_for_selector("#status.status-ready", timeout=60_000)
    page.set_input_files("#file-input", [str(frame)])
    card = _wait_card(page)
    assert "uncertain" in card.get_attribute("class").split()
    assert card.locator(".flag").is_visible() and card.locator(".flag").inner_text() == "Uncertain"
    assert card.locator(".badge").inner_text() in ("Nerve found", "No nerve found")
    assert "check the frame yourself" in card.locator(".uncertain-note").inner_text()
    assert "1 uncertain" in page.locator("#summary").inner_text()
    _save_artifact(page, tmp_path, "serve_page_uncertain.png")

    # The enlarged view: the frame and its outline, the outline's opacity adjustable.
    small = card.locator("img.overlay").bounding_box()["width"]
    card.locator("img.overlay").click()
    viewer = page.locator("#viewer")
    sync_api.expect(viewer).to_be_visible()
    assert page.locator("#viewer-title").inner_text() == "1_1.tif"
    assert page.locator("#viewer-verdict").inner_text().startswith("Uncertain · ")
    base = page.locator("#viewer-base")
    assert base.evaluate("i => i.complete && i.naturalWidth") == 580
    assert base.bounding_box()["width"] > 1.5 * small
    overlay = page.locator("#viewer-overlay")
    assert overlay.evaluate("i => getComputedStyle(i).opacity") == "1"
    page.locator("#viewer-opacity").fill("30")
    assert overlay.evaluate("i => getComputedStyle(i).opacity") == "0.3"
    assert page.locator("#viewer-opacity-value").inner_text() == "30\u00a0%"
    _save_artifact(page, tmp_path, "serve_page_enlarged.png")
    page.keyboard.press("Escape")
    sync_api.expect(viewer).to_be_hidden()

    # Far from the threshold: the decision stands alone.
    far = presence - 0.3 if presence >= 0.3 else presence + 0.3
    predictor.calibration = dataclasses.replace(saved, presence_threshold=far)
    page.reload()
    page.wait_for_selector("#status.status-ready", timeout=60_000)
    page.set_input_files("#file-input", [str(frame)])
    card = _wait_card(page)
    assert "uncertain" not in card.get_attribute("class").split()
    assert card.locator(".flag").is_hidden()
  finally:
    predictor.calibration = saved
