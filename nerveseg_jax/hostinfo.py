"""The CPU a measurement ran on: lscpu's model name, family, model and the ISA flags that
change convolution speed. CPU figures are only comparable on the same host."""

from __future__ import annotations

import os
import pathlib
import subprocess

# Instruction-set flags that change CPU convolution speed (lscpu / /proc/cpuinfo names).
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def parse(text: str) -> dict:
  """lscpu's (or /proc/cpuinfo's) TEXT -> {model_name, family, model, flags, cpus}."""
  fields: dict[str, str] = {}
  for line in text.splitlines():
    if ":" in line:
      key, value = line.split(":", 1)
      fields.setdefault(key.strip().lower(), value.strip())
  flags = set((fields.get("flags") or "").split())
  return {"model_name": fields.get("model name"),
          "family": fields.get("cpu family"),
          "model": fields.get("model"),
          "flags": {f: f in flags for f in FLAGS},
          "cpus": os.cpu_count()}


def cpu() -> dict:
  """This host's CPU (see parse)."""
  try:
    text = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    try:
      text = pathlib.Path("/proc/cpuinfo").read_text()  # the same keys, lower-cased
    except OSError:
      text = ""
  return parse(text)


def describe(h: dict) -> str:
  have = [f for f, on in h["flags"].items() if on]
  return (f"{h['model_name']} (family {h['family']}, model {h['model']}), "
          f"{h['cpus']} CPUs; {', '.join(have) if have else 'none of ' + ', '.join(FLAGS)}"
          " (AVX2 / AVX-512 / bf16 flags)")
