"""The serve command as a child process: start it, wait for its ready line, stop it.

For callers that need the real server over HTTP (the API tests, the latency benchmark)
rather than the app in process. The server binds 127.0.0.1 on a free port unless ARGS
say otherwise; the URL is read from its "ready on http://HOST:PORT" line.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import sys
import threading
from typing import Iterator

_READY = re.compile(r"ready on (http://\S+)")


@contextlib.contextmanager
def running(workdir, *args: str, timeout: float = 180.0,
            env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
  """Yields (url, process) of `python -m nerveseg_jax.serve --workdir WORKDIR --port 0 ARGS`.

  Raises RuntimeError with the server's last stderr lines if it is not ready within
  TIMEOUT seconds (or exits first). The server is stopped on leaving, killed if it does
  not stop within 20 seconds.
  """
  cmd = [sys.executable, "-m", "nerveseg_jax.serve", "--workdir", str(workdir),
         "--port", "0", *args]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ if env is None else env))
  # Both pipes are drained for the server's whole life: a full pipe would block it.
  stderr: collections.deque[str] = collections.deque(maxlen=30)
  found: list[str] = []
  ready = threading.Event()

  def read_stdout():
    for line in proc.stdout:
      m = _READY.match(line)
      if m and not found:
        found.append(m.group(1))
        ready.set()
    ready.set()  # the server exited

  threading.Thread(target=read_stdout, daemon=True).start()
  threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
  try:
    ready.wait(timeout)
    if not found:
      raise RuntimeError(f"serve --workdir {workdir}: not ready after {timeout:.0f}s "
                         f"(exit {proc.poll()}):\n" + "".join(stderr))
    yield found[0], proc
  finally:
    stop(proc)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
  """Terminates PROC, and kills it if it is still running after GRACE_S seconds."""
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(grace_s)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()

