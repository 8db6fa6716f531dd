"""The clinician's page: upload ultrasound frames, see the nerve or "No nerve found".

  python -m nerveseg_jax.serve --workdir DIR [--workdir DIR2 ...] \
      [--classifier_workdir DIR3] [--host 127.0.0.1] [--port 8000] \
      [--max_upload_mb 20] [--max_pixels 4194304] [--max_concurrent 2] [--tta] \
      [--batch_size 1] [--uncertain_margin 0.1]

Loads the runs and compiles the jitted inference once (one program, whatever the frame
sizes; see docs/serve.md), then prints
"ready on http://HOST:PORT". Open that address in a browser, or use the API:
POST /api/segment (multipart field `file`) and GET /healthz. See docs/serve.md.
Binds to 127.0.0.1 unless told otherwise: the app has no log-in. Bound to localhost,
it answers only requests addressed to localhost.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Sequence

from nerveseg_jax import cli, inference, webapp


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.parser("nerveseg-serve", __doc__.split("\n\n")[0],
                 "example:\n  nerveseg-serve --workdir runs/unet   # then open the printed "
                 "address")
  cli.add_workdir(p, multiple=True, help_text="segmentation run, or a cross-validation "
                  "folder (nerveseg-sweep --folds: its folds); repeat to ensemble")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to bind; 0.0.0.0 exposes the page to the network")
  p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
  p.add_argument("--max_upload_mb", type=float, default=20.0,
                 help="largest accepted file, in MB (413 above)")
  p.add_argument("--max_pixels", type=int, default=webapp.Limits.max_pixels,
                 help="largest accepted image, width x height (413 above); with "
                      "--max_concurrent it bounds the memory that requests use")
  p.add_argument("--max_concurrent", type=int, default=None,
                 help="requests decoded, inferred and encoded at once; the rest wait "
                      f"(default: the larger of {webapp.Limits.max_concurrent} and "
                      "--batch_size)")
  cli.add_inference(p, batch_size=1)  # requests arriving together share a batch
  p.add_argument("--uncertain_margin", type=float, default=0.1,
                 help="the page marks a presence probability this close to the presence "
                      "threshold as 'Uncertain' (0 to 0.5)")
  args = cli.parse(p, argv)
  if not 0.0 <= args.uncertain_margin <= 0.5:
    p.error(f"--uncertain_margin must be in [0, 0.5], got {args.uncertain_margin}")
  if not 0 <= args.port <= 65535:
    p.error(f"--port must be in 0..65535, got {args.port}")
  if args.max_upload_mb <= 0:
    p.error(f"--max_upload_mb must be > 0, got {args.max_upload_mb}")
  if args.max_pixels < 1:
    p.error(f"--max_pixels must be > 0, got {args.max_pixels}")
  if args.batch_size < 1:
    p.error(f"--batch_size must be >= 1, got {args.batch_size}")
  if args.max_concurrent is None:
    args.max_concurrent = max(webapp.Limits.max_concurrent, args.batch_size)
  if args.max_concurrent < 1:
    p.error(f"--max_concurrent must be >= 1, got {args.max_concurrent}")
  return args


def _check_workdirs(args: argparse.Namespace) -> None:
  """Fails fast, before binding a port, on workdirs that cannot be runs."""
  for w in args.workdir:
    inference.check_run(w)
  if args.classifier_workdir:
    inference.check_run(args.classifier_workdir, "--classifier_workdir")


def _announce(server, worker: webapp.InferenceWorker, host: str) -> None:
  """Prints "ready on ..." once the port is bound and the model compiled; else stops."""
  worker.done.wait()
  if worker.state != "ready":  # the worker has logged why
    server.should_exit = True
    return
  while not server.started:
    if server.should_exit:
      return
    threading.Event().wait(0.05)
  port = server.servers[0].sockets[0].getsockname()[1]
  shown = f"[{host}]" if ":" in host else host
  inference.log(worker.predictor.describe())
  print(f"ready on http://{shown}:{port}", flush=True)


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  _check_workdirs(args)
  import uvicorn  # pylint: disable=g-import-not-at-top

  def load() -> inference.Predictor:
    return inference.Predictor(args.workdir, args.classifier_workdir, tta=args.tta,
                               batch_size=args.batch_size, which=args.which)

  limits = webapp.Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         max_pixels=args.max_pixels, max_concurrent=args.max_concurrent)
  # Our --max_pixels is checked on the header first; lift PIL's own bomb guard above it
  # so that a user who raises the limit is not refused by a second, hidden one.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < args.max_pixels:
    Image.MAX_IMAGE_PIXELS = args.max_pixels
  local = args.host in webapp.LOCAL_HOST_NAMES
  app = webapp.create_app(load, limits, uncertain_margin=args.uncertain_margin,
                          which=args.which,
                          allowed_hosts=webapp.LOCAL_HOST_NAMES if local else None)
  if not local:
    inference.log(f"warning: --host {args.host} serves the page beyond this machine, "
                  "with no log-in; put it behind an authenticating proxy")
  inference.log("loading and compiling the runs ...")
  server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                         log_level="warning", timeout_graceful_shutdown=5))
  threading.Thread(target=_announce, args=(server, app.state.worker, args.host),
                   daemon=True).start()
  server.run()
  worker = app.state.worker
  return 1 if worker.state == "error" else 0



if __name__ == "__main__":
  sys.exit(main())
