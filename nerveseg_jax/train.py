"""Training: `nerveseg-train --config unet[:VARIANT] [--workdir DIR] [--config.KEY=V ...]`
(also `python -m nerveseg_jax.train`). Parses flags, calls
`trainer.train_and_evaluate`, prints the result; resuming is automatic.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nerveseg_jax import cli
from nerveseg_jax.checkpoint import CheckpointMismatchError
# The loop's public names, importable from the command's module as before.
from nerveseg_jax.trainer import NonFiniteLossError, WorkdirError, train_and_evaluate

__all__ = ["main", "run", "train_and_evaluate", "NonFiniteLossError", "WorkdirError"]


_EPILOG = """config variants (after the colon; they compose, e.g. unet:folder,smoke):
  unet        {unet}
  classifier  {classifier}

examples:
  nerveseg-train --config unet:synthetic
  nerveseg-train --config configs/unet.py:folder --config.data.manual_dir=~/frames \\
      --config.num_train_steps=2000 --workdir runs/my_frames
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.parser(
      "nerveseg-train", "Train a model (resumes from --workdir's checkpoints if any).",
      _EPILOG.format(unet=", ".join(cli.config_variants("unet")),
                     classifier=", ".join(cli.config_variants("classifier"))))
  cli.add_config(p)
  cli.add_workdir(p, required=False,
                  help_text="output directory (default ./runs/<config>[_<variant>])")
  return cli.parse(p, argv)


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  config = args.config
  config.lock()
  # A string, not pathlib: gs://bucket/run must keep its double slash.
  workdir = args.workdir or str(cli.default_workdir(args.config_arg, config))
  try:
    result = train_and_evaluate(config, workdir)
  except (CheckpointMismatchError, NonFiniteLossError, WorkdirError) as e:
    raise ValueError(str(e)) from None  # one line, through cli.run
  rows = [(k, v) for k, v in result.items() if k != "history"]
  print(f"done: {workdir}\n" + cli.table(rows, header=("result", "value")))
  if result.get("preempted"):
    # 128 + SIGTERM, as if the signal had ended the process: schedulers (SLURM requeue,
    # JobSet/XPK restart policies) then restart the job, which resumes from the workdir.
    print(f"preempted: checkpoint saved in {workdir}; run the same command to resume")
    return 143
  return 0


def run() -> None:
  """Console-script entry (`nerveseg-train`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
