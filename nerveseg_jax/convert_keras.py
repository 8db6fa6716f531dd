"""Keras Inception-ResNet-v2 ImageNet weights -> an Orbax checkpoint for `init_from`.

  python -m nerveseg_jax.convert_keras \
      --h5 ~/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5 \
      --out ~/irv2_imagenet_notop [--in_channels 1|3]

Nothing is downloaded: bring the file (Keras publishes it next to keras.applications;
a Keras 3 `model.save_weights('x.weights.h5')` of the same architecture works too).

Output format: DIR is written by `orbax.checkpoint.StandardCheckpointer().save(DIR,
state)` where `state = nnx.state(model).to_pure_dict()` of
`InceptionResNetV2(include_top=False, in_channels=...)` (parameters and batch-norm
statistics; the no-top model holds nothing else): a nested dict keyed by the
model's attribute paths (e.g. `stem/conv_1a/conv/kernel`, `block35/0/up/bias`,
`conv_7b/bn/mean`), float32 numpy arrays, parameters and batch-norm statistics
together. The classifier's `init_from` restores it by key; keys the classifier has and
the checkpoint lacks (the head) keep their initial value. A 3-channel checkpoint also
feeds a 1-channel model: the stem kernel is summed over RGB (here with --in_channels 1,
or by `init_from` at load time).
"""

import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nerveseg_jax import cli
from nerveseg_jax.models import keras_import


def convert(h5: str | pathlib.Path, out: str | pathlib.Path, *, in_channels: int = 3
            ) -> dict:
  """Writes the Orbax checkpoint; returns {'arrays', 'values', 'out'} for the summary."""
  out = pathlib.Path(out).expanduser().absolute()
  if out.exists():
    raise FileExistsError(f"--out {out} already exists; choose a new directory")
  model = keras_import.build_from_keras(h5, in_channels=in_channels)
  pure = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)).to_pure_dict()
  pure = jax.tree.map(np.asarray, pure)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out, pure)
  ckptr.wait_until_finished()
  leaves = jax.tree.leaves(pure)
  return dict(arrays=len(leaves), values=int(sum(a.size for a in leaves)), out=str(out))


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("nerveseg-convert-keras",
                 "Convert Keras Inception-ResNet-v2 (no-top) weights to an Orbax "
                 "checkpoint for --config.init_from.",
                 "example:\n  nerveseg-convert-keras --h5 inception_resnet_v2_weights_tf_dim_"
                 "ordering_tf_kernels_notop.h5 --out ~/irv2_imagenet_notop")
  p.add_argument("--h5", required=True, help="legacy .h5 or Keras 3 .weights.h5 file")
  p.add_argument("--out", required=True, help="new directory for the Orbax checkpoint")
  p.add_argument("--in_channels", type=int, choices=(1, 3), default=3,
                 help="3 keeps the RGB stem; 1 sums it over RGB for gray input")
  a = cli.parse(p, argv)
  try:
    summary = convert(a.h5, a.out, in_channels=a.in_channels)
  except keras_import.KerasImportError as e:
    raise ValueError(str(e)) from None
  print(f"wrote {summary['out']}: InceptionResNetV2 no-top, in_channels={a.in_channels}, "
        f"{summary['arrays']} arrays, {summary['values']:,} values (params + batch-norm "
        f"statistics) from {a.h5}")
  print(f"use it with --config.init_from={summary['out']}")
  return 0



if __name__ == "__main__":
  sys.exit(main())
