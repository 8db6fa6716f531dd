"""U-Net with a nerve-presence head, in Flax NNX (NHWC).

Level i of the encoder has `features * 2**i` channels, i = 0..depth; `depth` 2x2
max-pools lead to the bottleneck (level `depth`). The decoder upsamples (2x2
transposed conv, or bilinear resize + 3x3 conv), concatenates the skip and applies
the same block. With norm='none', block='double_conv', upsample='transpose',
presence_head=False this is exactly the classic U-Net of
the PyTorch reference U-Net of docs/bench/compare_torch.py (features=32, depth=4 there).

The presence head pools the bottleneck globally and maps it through a small MLP to one
logit (is there a nerve in this frame?): segmenting and detecting jointly was the design
of the strongest Kaggle solutions.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nerveseg_jax.models.layers import BatchNorm
from nerveseg_jax.models.tracing import linear_init

BLOCKS = ("double_conv", "residual")
NORMS = ("batch", "group", "none")
UPSAMPLES = ("transpose", "resize")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"UNet: {name}={value!r} is not one of {list(choices)}")


def _num_groups(channels: int, max_groups: int = 8) -> int:
  """The largest group count <= max_groups that divides `channels`."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


class _Norm(nnx.Module):
  """Batch, group or no normalisation over the channel axis."""

  def __init__(self, channels: int, kind: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.kind = kind
    if kind == "batch":
      # 0.9 rather than Flax's 0.99: runs here are a few thousand steps from scratch,
      # and the running statistics must catch up with the weights well before the end.
      self.norm = BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    elif kind == "group":
      self.norm = nnx.GroupNorm(channels, num_groups=_num_groups(channels), epsilon=1e-5,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    return x if self.norm is None else self.norm(x)


class _ConvNormAct(nnx.Module):
  """3x3 'same' conv, optional norm, optional ReLU. The conv has a bias only without norm."""

  def __init__(self, cin: int, cout: int, norm: str, *, kernel: int = 3, act: bool = True,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), padding="SAME", use_bias=norm == "none",
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = _Norm(cout, norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.norm(self.conv(x))
    return nnx.relu(x) if self.act else x


class DoubleConv(nnx.Module):
  """Two (3x3 conv, norm, ReLU): the classic U-Net block."""

  def __init__(self, cin: int, cout: int, norm: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = _ConvNormAct(cin, cout, norm, **kw)
    self.conv2 = _ConvNormAct(cout, cout, norm, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv2(self.conv1(x))


class ResidualBlock(nnx.Module):
  """Two 3x3 convs with an identity (or 1x1 projection) shortcut, ReLU after the sum."""

  def __init__(self, cin: int, cout: int, norm: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = _ConvNormAct(cin, cout, norm, **kw)
    self.conv2 = _ConvNormAct(cout, cout, norm, act=False, **kw)
    self.shortcut = (_ConvNormAct(cin, cout, norm, kernel=1, act=False, **kw)
                     if cin != cout else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    skip = x if self.shortcut is None else self.shortcut(x)
    return nnx.relu(self.conv2(self.conv1(x)) + skip)


class _Up(nnx.Module):
  """2x upsampling: a 2x2 stride-2 transposed conv, or bilinear resize + 3x3 conv."""

  def __init__(self, cin: int, cout: int, kind: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.kind = kind
    if kind == "transpose":
      self.conv = nnx.ConvTranspose(cin, cout, (2, 2), strides=(2, 2), padding="VALID",
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.conv = nnx.Conv(cin, cout, (3, 3), padding="SAME", dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "resize":
      b, h, w, c = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear")
      return self.conv(x)
    return _transpose_2x2(self.conv, x)


def _transpose_2x2(conv: nnx.ConvTranspose, x: jax.Array) -> jax.Array:
  """The 2x2 stride-2 transposed conv as one matmul plus a depth-to-space reshape.

  Same parameters and result as conv(x): each output pixel (2i+a, 2j+b) sees exactly
  one input pixel, through kernel tap (1-a, 1-b) (lax.conv_transpose flips the
  kernel). XLA:CPU lowers lax.conv_transpose to a conv over a zero-dilated input, 4x
  the work, and its backward is ~25x slower than this form's; a plain 2-D matmul
  (B*H*W, C) x (C, 4*O) then a transpose beats an einsum with interleaved output axes
  by ~1.5x forward and backward (docs/performance.md). On GPU/TPU it is a matmul too.
  """
  kernel = conv.kernel[...][::-1, ::-1]
  bias = conv.bias[...] if conv.bias is not None else None
  dtype = conv.dtype or jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  b, h, w, c = x.shape
  o = kernel.shape[-1]
  y = x.reshape(b * h * w, c) @ kernel.transpose(2, 0, 1, 3).reshape(c, 4 * o)
  y = y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max pool of (B, H, W, C), H and W even; same values as nnx.max_pool.

  Why not nnx.max_pool: its gradient (reduce_window + select_and_scatter, which
  XLA:CPU expands into argmax index arrays) cost ~6x this form's forward + backward
  on CPU (~0.35 s of a 2.9 s U-Net step, docs/performance.md). Here the backward is
  one elementwise pass: the gradient goes to the window's maximum, split evenly
  between exact ties (as jnp.max's gradient does).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_fwd(x: jax.Array):
  b, h, w, c = x.shape
  x6 = x.reshape(b, h // 2, 2, w // 2, 2, c)
  y = x6.max(axis=(2, 4))
  return y, (x6, y)


def _max_pool_bwd(res, g: jax.Array):
  x6, y = res
  b, h, _, w, _, c = x6.shape
  hit = x6 == y[:, :, None, :, None]
  ties = hit.sum(axis=(2, 4), keepdims=True).astype(g.dtype)
  dx = jnp.where(hit, (g[:, :, None, :, None] / ties), 0).astype(x6.dtype)
  return (dx.reshape(b, 2 * h, 2 * w, c),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class UNet(nnx.Module):
  """U-Net returning (mask_logits (B,H,W,1), presence_logit (B,) or None[, deep]).

  Any input size works: the input is edge-padded to a multiple of 2**depth and the
  outputs are cropped back, so they have the input's spatial shape. `deep` (only with
  deep_supervision=True) is a tuple of `depth - 1` extra mask logits from the coarser
  decoder levels, coarse to fine, each upsampled to (B,H,W,1). All outputs are float32
  whatever the compute dtype, so that losses stay stable in bfloat16.
  """

  @linear_init  # the whole network's construction stays linear when traced
  def __init__(self, *, in_channels: int = 1, features: int = 32, depth: int = 4,
               block: str = "double_conv", norm: str = "batch", dropout: float = 0.0,
               upsample: str = "transpose", deep_supervision: bool = False,
               presence_head: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    _check_choice("block", block, BLOCKS)
    _check_choice("norm", norm, NORMS)
    _check_choice("upsample", upsample, UPSAMPLES)
    if int(depth) < 1:
      raise ValueError(f"UNet: depth={depth} must be >= 1")
    if int(features) < 1 or int(in_channels) < 1:
      raise ValueError(f"UNet: features={features} and in_channels={in_channels} must be >= 1")
    if not 0.0 <= float(dropout) < 1.0:
      raise ValueError(f"UNet: dropout={dropout} must be in [0, 1)")
    self.depth = int(depth)
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    block_cls = DoubleConv if block == "double_conv" else ResidualBlock
    widths = [int(features) * 2**i for i in range(self.depth + 1)]

    down, cin = [], int(in_channels)
    for w in widths:
      down.append(block_cls(cin, w, norm, **kw))
      cin = w
    self.down = nnx.List(down)
    ups, merges = [], []
    for w in reversed(widths[:-1]):
      ups.append(_Up(cin, w, upsample, **kw))
      merges.append(block_cls(2 * w, w, norm, **kw))
      cin = w
    self.up = nnx.List(ups)
    self.merge = nnx.List(merges)
    self.out = nnx.Conv(cin, 1, (1, 1), **kw)
    # Deep supervision reads every decoder level but the last (which is `out`).
    self.deep = (nnx.List([nnx.Conv(w, 1, (1, 1), **kw)
                           for w in list(reversed(widths[:-1]))[:-1]])
                 if deep_supervision else None)
    # Regularises the bottleneck, which feeds both the decoder and the presence head.
    self.dropout = nnx.Dropout(float(dropout), rngs=rngs) if dropout > 0 else None
    if presence_head:
      hidden = max(widths[-1] // 4, 8)
      self.presence_hidden = nnx.Linear(widths[-1], hidden, **kw)
      self.presence_out = nnx.Linear(hidden, 1, **kw)
    else:
      self.presence_hidden = self.presence_out = None

  def __call__(self, x: jax.Array):
    if x.ndim != 4:
      raise ValueError(f"UNet expects (B, H, W, C) input, got shape {x.shape}")
    b, h, w, _ = x.shape
    m = 2**self.depth
    ph, pw = -h % m, -w % m
    x = x.astype(self.dtype)
    if ph or pw:
      # Edge padding keeps the border statistics close to the image's own.
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")

    skips = []
    for i, block in enumerate(self.down):
      x = block(x)
      if i < self.depth:
        skips.append(x)
        x = max_pool_2x2(x)
    if self.dropout is not None:
      x = self.dropout(x)

    presence = None
    if self.presence_out is not None:
      pooled = jnp.mean(x, axis=(1, 2))
      hidden = nnx.relu(self.presence_hidden(pooled))
      if self.dropout is not None:
        hidden = self.dropout(hidden)
      presence = self.presence_out(hidden)[:, 0].astype(jnp.float32)

    deep = []
    for i, (up, merge, skip) in enumerate(zip(self.up, self.merge, reversed(skips))):
      x = merge(jnp.concatenate([up(x), skip], axis=-1))
      if self.deep is not None and i < len(self.deep):
        d = self.deep[i](x).astype(jnp.float32)
        d = jax.image.resize(d, (b, h + ph, w + pw, 1), method="bilinear")
        deep.append(d[:, :h, :w])
    mask = self.out(x)[:, :h, :w].astype(jnp.float32)
    if self.deep is not None:
      return mask, presence, tuple(deep)
    return mask, presence
