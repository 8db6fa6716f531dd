"""The clinician's web app: a FastAPI factory around one `inference.Predictor`.

Routes:
  GET  /             the page (static/index.html; no external assets, works offline)
  GET  /static/...   its script and style sheet
  GET  /healthz      200 {"status": "ready", ...} once the runs are loaded and compiled,
                     503 {"status": "loading"} before, 503 {"status": "error"} if loading failed
  POST /api/segment  multipart field `file` -> the frame's result as JSON (see docs/serve.md)

The predictor lives on one worker thread (`InferenceWorker`): it loads the runs,
compiles once (Predictor.warmup), then serves a queue. A jitted function with its
device buffers is not a thing to call from many threads at once, and the machine may
be small, so inference is serialised there; requests waiting for it only await a
future, so the event loop keeps answering /healthz and reading uploads meanwhile.
Requests that arrive together are run as one batch of up to `predictor.batch_size`.

Every error is JSON {"error": message} with a 4xx status (5xx only for our own bugs),
and no error stops the server.

Memory is bounded per request by Limits.max_pixels (checked on the image header) and
overall by Limits.max_concurrent: only that many requests decode, wait for inference
or encode their answer at once. A server on localhost answers only requests addressed
to localhost (the Host header), so a web page elsewhere cannot reach it through DNS
rebinding; /healthz names runs, never the server's paths.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import pathlib
import queue
import re
import threading
import traceback
from typing import Any, Callable, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from nerveseg_jax import imageio, inference, runinfo

STATIC_DIR = pathlib.Path(__file__).parent / "static"
# The Host header names a server bound to the loopback interface may answer to.
LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "::1")
# Room for the multipart boundary and part headers around the file itself.
_MULTIPART_SLACK = 64 * 1024
# Same-origin only: the page must never pull anything from the network.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'")


# The peak memory of one request, from decode to the JSON answer with its PNGs,
# measured on a server's RSS (docs/serve.md): about 20 bytes a pixel for an
# incompressible frame, the worst case, 10 for a blank one, plus a fixed part. Rounded up.
PEAK_BYTES_PER_PIXEL = 24
PEAK_BYTES_FIXED = 32 * 2**20


def peak_request_bytes(pixels: int) -> int:
  """The documented bound on one request's memory for a frame of `pixels` pixels."""
  return PEAK_BYTES_PER_PIXEL * pixels + PEAK_BYTES_FIXED


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one upload may be, and how many are worked on at once.

  max_pixels bounds a request's memory (peak_request_bytes: about 130 MB at the
  default 2048 x 2048) and max_concurrent how many requests hold that much at once;
  the others wait, holding only their upload (spooled to disk above 1 MB).
  """
  max_upload_bytes: int = 20 * 1024 * 1024
  max_pixels: int = 2048 * 2048
  max_concurrent: int = 2

  def __post_init__(self):
    if self.max_upload_bytes < 1:
      raise ValueError(f"--max_upload_mb must be > 0, got {self.max_upload_bytes} bytes")
    if self.max_pixels < 1:
      raise ValueError(f"--max_pixels must be > 0, got {self.max_pixels}")
    if self.max_concurrent < 1:
      raise ValueError(f"--max_concurrent must be >= 1, got {self.max_concurrent}")


class UploadError(Exception):
  """A client mistake: answered with `status` and {"error": message}."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def _mb(n: int) -> str:
  return f"{n / (1024 * 1024):g} MB"


# --- the inference thread ------------------------------------------------------------


@dataclasses.dataclass
class _Job:
  frame: np.ndarray
  name: str
  future: concurrent.futures.Future


class InferenceWorker:
  """Owns the Predictor on one thread: load, warm up, then answer queued frames.

  Args:
    load: builds the Predictor (called on the worker thread, so the server can answer
      /healthz with 503 while runs load and compile).
    warmup: compile the one inference program (Predictor.warmup) before saying ready.
  """

  def __init__(self, load: Callable[[], inference.Predictor], *, warmup: bool = True):
    self._load = load
    self._warmup = warmup
    self._queue: queue.Queue[_Job | None] = queue.Queue()
    self._thread: threading.Thread | None = None
    self.predictor: inference.Predictor | None = None
    self.state = "loading"           # loading | ready | error
    self.error: str | None = None
    self.done = threading.Event()    # set once loading finished, well or not

  def start(self) -> None:
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name="nerveseg-inference",
                                      daemon=True)
      self._thread.start()

  def stop(self, timeout: float = 10.0) -> None:
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join(timeout)
      self._thread = None

  def check_ready(self) -> None:
    """Raises the 503 that says why frames cannot be answered yet."""
    if self.state == "loading":
      raise UploadError(503, "the model is still loading; try again in a moment")
    if self.state == "error":
      raise UploadError(503, f"the model failed to load: {self.error}")

  def submit(self, frame: np.ndarray, name: str) -> concurrent.futures.Future:
    """Queues one (H, W) uint8 frame; the future gives its FramePrediction."""
    self.check_ready()
    job = _Job(frame, name, concurrent.futures.Future())
    self._queue.put(job)
    return job.future

  def _run(self) -> None:
    try:
      predictor = self._load()
      if self._warmup:
        predictor.warmup()
      self.predictor = predictor
      self.state = "ready"
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {e}" if not isinstance(
          e, (FileNotFoundError, ValueError)) else str(e)
      self.error = without_paths(error)  # what clients see
      self.state = "error"
      inference.log(f"error: loading the runs failed: {error}")
    finally:
      self.done.set()
    while True:
      job = self._queue.get()
      if job is None:
        return
      jobs = [job]
      # Whatever arrived meanwhile rides along in the same device batch.
      limit = self.predictor.batch_size if self.predictor else 1
      while len(jobs) < limit:
        try:
          extra = self._queue.get_nowait()
        except queue.Empty:
          break
        if extra is None:
          self._queue.put(None)  # stop after this batch
          break
        jobs.append(extra)
      self._predict(jobs)

  def _predict(self, jobs: list[_Job]) -> None:
    jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
    if not jobs:
      return
    # A failing frame fails only its own request; the others still get answers.
    results = self.predictor.predict_each([j.frame for j in jobs], [j.name for j in jobs])
    for j, r in zip(jobs, results):
      if isinstance(r, Exception):
        inference.log(f"error: inference failed for {j.name}:\n"
                      + "".join(traceback.format_exception(r)))
        j.future.set_exception(r)
      else:
        j.future.set_result(r)


# --- request size limit --------------------------------------------------------------


class _TooLarge(Exception):
  pass


class BodyLimitMiddleware:
  """Refuses request bodies over `max_bytes` with 413, before and while reading them.

  Content-Length is checked up front; chunked bodies (no Content-Length) are counted
  as they stream in, so an oversized upload is never held in memory whole.
  """

  def __init__(self, app, max_bytes: int, max_upload_bytes: int):
    self.app = app
    self.max_bytes = max_bytes
    self.message = (f"file too large: the limit is {_mb(max_upload_bytes)} "
                    "(server option --max_upload_mb)")

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
      return await self.app(scope, receive, send)
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length")
    if length is not None:
      try:
        too_large = int(length) > self.max_bytes
      except ValueError:
        return await _error(400, "invalid Content-Length header")(scope, receive, send)
      if too_large:
        return await _error(413, self.message)(scope, receive, send)

    seen = 0
    started = False

    async def limited_receive():
      nonlocal seen
      message = await receive()
      if message["type"] == "http.request":
        seen += len(message.get("body", b""))
        if seen > self.max_bytes:
          raise _TooLarge()
      return message

    async def tracked_send(message):
      nonlocal started
      if message["type"] == "http.response.start":
        started = True
      await send(message)

    try:
      await self.app(scope, limited_receive, tracked_send)
    except _TooLarge:
      if started:
        raise
      await _error(413, self.message)(scope, receive, send)


def without_paths(message: str) -> str:
  """Absolute paths in a message cut to their last component: clients learn which run
  failed, not how the server's disk is laid out."""
  return re.sub(r"(?:(?<=^)|(?<=[\s'\"(=]))/(?:[^\s/'\"]+/)*([^\s/'\"]*)", r"\1", message)


def host_name(host_header: str) -> str:
  """The name in a Host header, without the port ('[::1]:80' -> '::1')."""
  host = host_header.strip().lower()
  if host.startswith("["):
    return host[1:host.find("]")] if "]" in host else host
  return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheckMiddleware:
  """Answers 400 to requests whose Host header is not one of `allowed`.

  A page on another site can point its own domain at 127.0.0.1 (DNS rebinding) and
  then read this server as same-origin; its requests still carry that domain in Host.
  """

  def __init__(self, app, allowed: Sequence[str]):
    self.app = app
    self.allowed = frozenset(h.lower() for h in allowed)

  async def __call__(self, scope, receive, send):
    if scope["type"] in ("http", "websocket"):
      headers = dict(scope.get("headers") or [])
      host = headers.get(b"host", b"").decode("latin-1")
      if host_name(host) not in self.allowed:
        shown = "".join(c for c in host if c.isprintable())[:100]
        return await _error(400, f"this server answers only as localhost, not as host "
                            f"{shown!r}")(scope, receive, send)
    return await self.app(scope, receive, send)


# --- the route's steps (run off the event loop) ---------------------------------------


def _safe_name(filename: str | None) -> tuple[str, str]:
  """(file name, frame name) from an upload's name; the frame name is the Kaggle `img`.

  Browsers send a bare name, other clients may send a path (either separator); keep
  only the last component, and only printable characters.
  """
  raw = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
  raw = "".join(c for c in raw if c.isprintable()).strip()[:200] or "upload"
  stem = raw.rsplit(".", 1)[0] if "." in raw.lstrip(".") else raw
  return raw, stem or "upload"


def _decode(data: bytes, filename: str, limits: Limits) -> np.ndarray:
  if len(data) > limits.max_upload_bytes:
    raise UploadError(413, f"{filename}: file too large ({_mb(len(data))}); the limit is "
                      f"{_mb(limits.max_upload_bytes)} (server option --max_upload_mb)")
  try:
    return imageio.decode_gray(data, filename, max_pixels=limits.max_pixels,
                               limit_hint=" (server option --max_pixels)")
  except imageio.ImageTooLarge as e:
    raise UploadError(413, str(e)) from None
  except imageio.ImageReadError as e:
    raise UploadError(422, str(e)) from None


def _b64png(array: np.ndarray) -> str:
  # Encoded for speed (no row filters, zlib level 1): shown once on the page, not stored.
  return base64.b64encode(imageio.png_bytes_fast(array)).decode("ascii")


def _payload(frame: np.ndarray, result: inference.FramePrediction, filename: str,
             with_images: bool, with_overlay: bool = False) -> dict[str, Any]:
  """The API's JSON for one frame: inference's fields, plus PNGs for the page.

  The page draws the overlay itself from the frame and the mask (static/app.js, the
  same arithmetic as imageio.overlay): an RGB overlay is the largest image to compose
  and encode, about half the answer's cost, and it only repeats what the other two
  hold. API clients that want it ask with `with_overlay`.
  """
  out = result.to_json()
  out.update(filename=filename, nerve_found=bool(result.decision),
             presence_percent=round(100.0 * float(result.presence), 1),
             area_fraction=round(result.area / max(1, result.mask.size), 6))
  if with_images:
    out["images"] = dict(
        original=_b64png(frame),  # browsers cannot show TIFF; this is the frame as read
        mask=_b64png(imageio.mask_png(result.mask)))
    if with_overlay:
      out["images"]["overlay"] = _b64png(imageio.overlay(frame, result.mask))
  return out


# --- the app --------------------------------------------------------------------------


def create_app(load: Callable[[], inference.Predictor] | inference.Predictor,
               limits: Limits | None = None, *, warmup: bool = True,
               uncertain_margin: float = 0.1, which: str = "best",
               allowed_hosts: Sequence[str] | None = LOCAL_HOST_NAMES) -> FastAPI:
  """The web app; loading starts with the app's lifespan (server start-up).

  Args:
    load: the Predictor, or a function that builds it (run on the inference thread, so
      /healthz answers 503 "loading" meanwhile).
    limits: upload and concurrency limits.
    warmup: compile before reporting ready.
    uncertain_margin: the page shows "Uncertain" beside the decision when the presence
      probability is within this of the presence threshold.
    which: the checkpoint the Predictor loaded ('best' or 'latest'), for /healthz.
    allowed_hosts: Host header names answered (any port); None answers every name,
      for a server bound beyond localhost behind a proxy.
  """
  limits = limits or Limits()
  if not 0.0 <= uncertain_margin <= 0.5:
    raise ValueError(f"--uncertain_margin must be in [0, 0.5], got {uncertain_margin}")
  about: dict[str, Any] = {}  # runinfo.model_info of the first run, read once
  loader = load if callable(load) else (lambda: load)
  worker = InferenceWorker(loader, warmup=warmup)
  gate: list[asyncio.Semaphore] = []  # made in the server's event loop

  @contextlib.asynccontextmanager
  async def lifespan(_: FastAPI):
    gate[:] = [asyncio.Semaphore(limits.max_concurrent)]
    worker.start()
    try:
      yield
    finally:
      await run_in_threadpool(worker.stop)

  app = FastAPI(title="nerveseg_jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.worker = worker
  app.state.limits = limits
  app.add_middleware(BodyLimitMiddleware,
                     max_bytes=limits.max_upload_bytes + _MULTIPART_SLACK,
                     max_upload_bytes=limits.max_upload_bytes)
  if allowed_hosts is not None:
    app.add_middleware(HostCheckMiddleware, allowed=allowed_hosts)  # before any body is read

  @app.middleware("http")
  async def security_headers(request: Request, call_next):
    response = await call_next(request)
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if request.url.path.startswith("/api/") or request.url.path == "/healthz":
      response.headers.setdefault("Cache-Control", "no-store")  # results are patient data
    return response

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_: Request, exc: StarletteHTTPException):
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
      message = "not found"
    elif exc.status_code == 405:
      message = "method not allowed"
    return _error(exc.status_code, message)

  @app.exception_handler(RequestValidationError)
  async def validation_error(_: Request, exc: RequestValidationError):
    return _error(422, f"invalid request: {exc.errors()}")

  @app.exception_handler(UploadError)
  async def upload_error(_: Request, exc: UploadError):
    return _error(exc.status, exc.message)

  @app.exception_handler(Exception)
  async def internal_error(_: Request, exc: Exception):
    # Our bug, not the user's; the traceback goes to the server log, the server goes on.
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")

  @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
  async def index():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

  app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

  @app.get("/healthz")
  async def healthz():
    body: dict[str, Any] = dict(status=worker.state,
                                max_upload_bytes=limits.max_upload_bytes,
                                max_pixels=limits.max_pixels,
                                max_concurrent=limits.max_concurrent)
    if worker.state == "error":
      body["error"] = worker.error
    if worker.state != "ready":
      return JSONResponse(body, status_code=503)
    p = worker.predictor
    # Run names only: the server's paths are no business of its clients.
    body.update(workdirs=[f"{w.parent.name}/{w.name}" if w.parent in p.cv_dirs else w.name
                          for w in p.workdirs],
                classifier_workdir=p.classifier_workdir.name if p.classifier_workdir else None,
                tta=p.tta, batch_size=p.batch_size, calibration=p.calibration.to_dict())
    if not about:
      first = p.cv_dirs[0] if p.cv_dirs else p.workdirs[0]
      try:
        about.update(await run_in_threadpool(runinfo.model_info, first, which))
      except Exception as e:  # pylint: disable=broad-except
        # A run that cannot be described must not make the server look down.
        about.update(name=first.name, error=f"{type(e).__name__}: {e}")
    body.update(model=about, uncertain_margin=uncertain_margin)
    return body

  @app.post("/api/segment")
  async def segment(request: Request, images: bool = True, overlay: bool = False):
    """One frame in (multipart field `file`), its result out. `?images=false` skips the
    PNGs; `?overlay=true` adds the outline drawn over the frame to them."""
    worker.check_ready()  # answer before reading a body we cannot use yet
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
      raise UploadError(415, "send the image as multipart/form-data in the field 'file' "
                        f"(got Content-Type {content_type or 'none'!r})")
    try:
      form = await request.form(max_files=1, max_fields=8)
    except StarletteHTTPException as e:  # malformed multipart, too many parts
      raise UploadError(400, f"bad multipart upload: {e.detail}") from None
    try:
      upload = form.get("file")
      if not isinstance(upload, UploadFile):
        raise UploadError(400, "no file: send the image in the multipart field 'file'")
      filename, name = _safe_name(upload.filename)
      # Waiting requests hold only their upload (spooled to disk above 1 MB); the
      # decoded frame, its probabilities and the answer's PNGs exist inside the gate.
      async with gate[0]:
        data = await upload.read(limits.max_upload_bytes + 1)
        frame = await run_in_threadpool(_decode, data, filename, limits)
        del data
        result = await asyncio.wrap_future(worker.submit(frame, name))
        # Rendered to JSON here, off the event loop and still inside the gate.
        return await run_in_threadpool(
            lambda: JSONResponse(_payload(frame, result, filename, images, overlay)))
    finally:
      await form.close()

  return app
