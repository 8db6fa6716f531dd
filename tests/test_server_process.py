"""nerveseg_jax.server_process: a server that cannot start is reported, not waited on."""

import time

import pytest

from nerveseg_jax import server_process


def test_a_server_that_exits_is_reported_with_its_error_at_once(tmp_path):
  t = time.monotonic()
  with pytest.raises(RuntimeError) as e:
    with server_process.running(tmp_path, timeout=120):
      pass
  # The server's own one-line error travels with the exception, and the wait ends
  # when the process does, not at the timeout.
  assert f"serve --workdir {tmp_path}: not ready" in str(e.value)
  assert "no config.json" in str(e.value)
  assert time.monotonic() - t < 60
