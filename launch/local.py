#!/usr/bin/env python3
"""Runs N processes of one JAX program on this machine, as a cluster would.

Each process gets the same environment a multi-host launch gives it
(NERVESEG_COORDINATOR=127.0.0.1:PORT, NERVESEG_NUM_PROCESSES, NERVESEG_PROCESS_ID),
so `nerveseg_jax.sharding.maybe_initialize_distributed()` takes the real
`jax.distributed.initialize()` path, with CPU devices and gloo collectives. It is for
debugging multi-host code on one machine; the tests use it.

  python launch/local.py -n 2 -- --config configs/unet.py:smoke --workdir /tmp/run
  python launch/local.py -n 2 --devices_per_process 4 --dry-run -- --config ...
  python launch/local.py -n 2 --module my.module -- ARGS

Output lines are prefixed with the rank. If any process dies (non-zero exit or a
signal), the others are terminated at once and the launcher exits non-zero naming the
process that died: a multi-process job never hangs on a dead peer.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

_PROG = "launch/local.py"
# Environment that makes JAX auto-detect a real cluster. Launched from inside a SLURM
# or MPI allocation, it would override our 127.0.0.1 coordinator and device choice.
_CLUSTER_ENV_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """Returns a TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, rank: int, num_processes: int,
                port: int, devices_per_process: int,
                platform: str) -> dict[str, str]:
  """The environment of process `rank`: the cluster variables plus CPU devices."""
  env = {k: v for k, v in base.items()
         if not k.startswith(_CLUSTER_ENV_PREFIXES)}
  # Keep the user's other XLA flags, but ours decides the device count.
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith(_DEVICE_COUNT_FLAG)]
  xla_flags.append(f"{_DEVICE_COUNT_FLAG}={devices_per_process}")
  env.update(
      NERVESEG_COORDINATOR=f"127.0.0.1:{port}",
      NERVESEG_NUM_PROCESSES=str(num_processes),
      NERVESEG_PROCESS_ID=str(rank),
      JAX_PLATFORMS=platform,
      XLA_FLAGS=" ".join(xla_flags),
      # Line-by-line output, so the rank prefixes interleave sensibly.
      PYTHONUNBUFFERED="1",
  )
  return env


def describe_exit(returncode: int) -> str:
  """'exited with code 3' or 'was killed by signal SIGKILL' (Popen returncode)."""
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = str(-returncode)
    return f"was killed by signal {name}"
  return f"exited with code {returncode}"


@dataclasses.dataclass
class _Child:
  rank: int
  proc: subprocess.Popen
  reader: threading.Thread


class Launcher:
  """Starts the processes, relays their output, and fails fast."""

  def __init__(self, commands: Sequence[Sequence[str]],
               envs: Sequence[dict[str, str]], *, grace_s: float,
               timeout_s: float | None, out=sys.stdout):
    self._commands = commands
    self._envs = envs
    self._grace_s = grace_s
    self._timeout_s = timeout_s
    self._out = out
    self._lock = threading.Lock()
    self._children: list[_Child] = []
    self._stop_signal: int | None = None
    self._force = False

  def say(self, msg: str) -> None:
    with self._lock:
      self._out.write(f"[{_PROG}] {msg}\n")
      self._out.flush()

  def _relay(self, rank: int, stream) -> None:
    # Bytes in, so a child's odd encoding cannot kill the relay.
    for raw in iter(stream.readline, b""):
      line = raw.decode("utf-8", errors="replace").rstrip("\n")
      with self._lock:
        self._out.write(f"[{rank}] {line}\n")
        self._out.flush()
    stream.close()

  def _on_signal(self, signum, frame) -> None:
    del frame
    if self._stop_signal is not None:
      self._force = True  # a second Ctrl-C: do not wait out the grace period
    self._stop_signal = signum

  def _terminate_all(self, grace_s: float) -> None:
    """SIGTERM every live process group, then SIGKILL what is left after grace_s."""
    live = [c for c in self._children if c.proc.poll() is None]
    for c in live:
      _signal_group(c.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (not self._force and time.monotonic() < deadline
           and any(c.proc.poll() is None for c in live)):
      time.sleep(0.05)
    for c in live:
      if c.proc.poll() is None:
        _signal_group(c.proc, signal.SIGKILL)
        c.proc.wait()

  def run(self) -> int:
    """Runs all processes to the end; returns the launcher's exit code."""
    old_handlers = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      return self._run()
    finally:
      for s, h in old_handlers.items():
        signal.signal(s, h)
      for c in self._children:
        c.reader.join(timeout=5)

  def _start(self) -> None:
    for rank, (cmd, env) in enumerate(zip(self._commands, self._envs)):
      # Own session: a terminal's Ctrl-C reaches only the launcher, which then
      # forwards SIGTERM (the checkpoint-on-preemption path) to every process.
      proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
      reader = threading.Thread(target=self._relay, args=(rank, proc.stdout),
                                daemon=True)
      reader.start()
      self._children.append(_Child(rank, proc, reader))
      self.say(f"rank {rank}: pid {proc.pid}")

  def _run(self) -> int:
    n = len(self._commands)
    try:
      self._start()
    except OSError as e:
      self.say(f"could not start process {len(self._children)}: {e}")
      self._terminate_all(0)
      return 1
    start = time.monotonic()
    while True:
      if self._stop_signal is not None:
        name = signal.Signals(self._stop_signal).name
        self.say(f"got {name}; sending SIGTERM to all {n} processes "
                 f"(they checkpoint), SIGKILL after {self._grace_s:g} s")
        self._terminate_all(self._grace_s)
        return 128 + self._stop_signal
      failed = [c for c in self._children if c.proc.poll() not in (None, 0)]
      if failed:
        # A peer's death makes the others fail in their next collective. When we
        # see several at once, a signal (kill, OOM) is the likelier first cause.
        failed.sort(key=lambda c: (c.proc.returncode >= 0, c.rank))
        dead = failed[0]
        others = [c for c in self._children if c.proc.poll() is None]
        self.say(f"process {dead.rank} (pid {dead.proc.pid}) "
                 f"{describe_exit(dead.proc.returncode)}; terminating the other "
                 f"{len(others)} running process(es)")
        for c in failed[1:]:
          self.say(f"process {c.rank} (pid {c.proc.pid}) also "
                   f"{describe_exit(c.proc.returncode)}")
        # The survivors are likely stuck in a collective with the dead peer, so a
        # checkpoint cannot complete: a short grace, then SIGKILL.
        self._terminate_all(min(self._grace_s, 5.0))
        rc = dead.proc.returncode
        return rc if rc > 0 else 128 - rc
      if all(c.proc.poll() == 0 for c in self._children):
        self.say(f"all {n} processes finished")
        return 0
      if (self._timeout_s is not None
          and time.monotonic() - start > self._timeout_s):
        self.say(f"timeout: still running after {self._timeout_s:g} s "
                 "(--timeout_s); killing all processes")
        self._terminate_all(self._grace_s)
        return 124
      time.sleep(0.05)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:
    pass


def _module_exists(name: str) -> bool:
  # `python -m` looks in the working directory first; so do we.
  sys.path.insert(0, os.getcwd())
  try:
    return importlib.util.find_spec(name) is not None
  except ImportError:  # a missing parent package
    return False
  finally:
    sys.path.pop(0)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `launcher options -- program arguments`."""
  argv = list(argv)
  if "--" in argv:
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1:]
  else:
    own, rest = argv, []
  p = argparse.ArgumentParser(
      prog=_PROG, description=__doc__.split("\n\n")[0],
      epilog="Arguments after -- go to the module unchanged.")
  p.add_argument("-n", "--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=1,
                 help="CPU devices per process (XLA_FLAGS="
                 f"{_DEVICE_COUNT_FLAG}=N)")
  p.add_argument("--module", default="nerveseg_jax.train",
                 help="the module run with python -m (default: %(default)s)")
  p.add_argument("--port", type=int, default=0,
                 help="coordinator port on 127.0.0.1 (default: a free one)")
  p.add_argument("--platform", default="cpu",
                 help="JAX_PLATFORMS for the processes (default: %(default)s)")
  p.add_argument("--grace_s", type=float, default=30.0,
                 help="seconds between SIGTERM and SIGKILL when stopping")
  p.add_argument("--timeout_s", type=float, default=None,
                 help="kill everything and exit 124 after this many seconds")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print each process's command and environment, run nothing")
  args = p.parse_args(own)
  if args.num_processes < 1:
    p.error(f"-n/--num_processes must be >= 1, got {args.num_processes}")
  if args.devices_per_process < 1:
    p.error("--devices_per_process must be >= 1, "
            f"got {args.devices_per_process}")
  if not 0 <= args.port < 65536:
    p.error(f"--port must be in [0, 65535], got {args.port}")
  return args, rest


def main(argv: Sequence[str] | None = None) -> int:
  args, program_args = parse_args(sys.argv[1:] if argv is None else argv)
  port = args.port or free_port()
  command = [sys.executable, "-m", args.module, *program_args]
  envs = [process_env(dict(os.environ), rank=r, num_processes=args.num_processes,
                      port=port, devices_per_process=args.devices_per_process,
                      platform=args.platform)
          for r in range(args.num_processes)]
  if args.dry_run:
    shown = ("NERVESEG_COORDINATOR", "NERVESEG_NUM_PROCESSES",
             "NERVESEG_PROCESS_ID", "JAX_PLATFORMS", "XLA_FLAGS")
    for env in envs:
      assignments = [f"{k}={shlex.quote(env[k])}" for k in shown]
      print(" ".join(assignments + [shlex.join(command)]))
    return 0
  if not _module_exists(args.module):
    print(f"{_PROG}: module {args.module!r} (--module) is not importable from "
          f"{os.getcwd()}; is the package installed (pip install -e .)?",
          file=sys.stderr)
    return 2
  launcher = Launcher([command] * args.num_processes, envs,
                      grace_s=args.grace_s, timeout_s=args.timeout_s)
  rc = launcher.run()
  if rc != 0:
    print(f"{_PROG}: failed ({rc}); see the message above", file=sys.stderr)
  return rc


if __name__ == "__main__":
  sys.exit(main())
