"""Inception-ResNet-v2 in Flax NNX, layer for layer as keras.applications builds it.

Stem, mixed_5b, 10x block35 (scale 0.17), mixed_6a, 20x block17 (scale 0.1), mixed_7a,
9x block8 (scale 0.2) plus a final block8 (scale 1.0, no activation), conv_7b (1536, 1x1).
Every conv is Keras's `conv2d_bn`: conv without bias, BatchNorm (eps 1e-3, momentum
0.99, no scale), ReLU; the blocks' 'up' projections have a bias and no norm. 'valid' and
'same' paddings follow Keras layer by layer (stride-2 convs are all 'valid'), which is
what makes converted ImageNet weights give the same features (models/keras_import.py).

Attribute paths of the backbone do not depend on `include_top`, so a no-top
checkpoint (convert_keras) restores by key into the classifier.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nerveseg_jax.models.layers import BatchNorm
from nerveseg_jax.models.tracing import linear_init

MIN_SIZE = 75  # smallest input for which every 'valid' reduction keeps >= 1 pixel
# Repeats of block35, block17 and block8 in the published network (and its weights).
# Fewer give the same architecture, shallower: the classifier's smoke variant, which
# tests the whole pipeline in a fraction of the compile time.
BLOCKS = (10, 20, 10)


class ConvBN(nnx.Module):
  """Keras `conv2d_bn`: conv (no bias) -> BatchNorm(eps 1e-3, no scale) -> optional ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, strides: int = 1,
               padding: str = "same", act: bool = True, dtype, param_dtype, rngs: nnx.Rngs):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    self.conv = nnx.Conv(cin, cout, kernel, strides=(strides, strides),
                         padding=padding.upper(), use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.bn = BatchNorm(cout, momentum=0.99, epsilon=1e-3, use_scale=False, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.bn(self.conv(x))
    return nnx.relu(x) if self.act else x


def _max_pool_valid(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Stem(nnx.Module):
  """Conv 3x3/2 valid, 3x3 valid, 3x3 same, maxpool, 1x1 valid, 3x3 valid, maxpool."""

  def __init__(self, cin: int, **kw):
    self.conv_1a = ConvBN(cin, 32, 3, strides=2, padding="valid", **kw)
    self.conv_2a = ConvBN(32, 32, 3, padding="valid", **kw)
    self.conv_2b = ConvBN(32, 64, 3, **kw)
    self.conv_3b = ConvBN(64, 80, 1, padding="valid", **kw)
    self.conv_4a = ConvBN(80, 192, 3, padding="valid", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_2b(self.conv_2a(self.conv_1a(x)))
    x = _max_pool_valid(x)
    x = self.conv_4a(self.conv_3b(x))
    return _max_pool_valid(x)

  def keras_order(self) -> list[ConvBN]:
    return [self.conv_1a, self.conv_2a, self.conv_2b, self.conv_3b, self.conv_4a]


class Mixed5b(nnx.Module):
  """192 -> 320 channels: 1x1 | 1x1,5x5 | 1x1,3x3,3x3 | avgpool,1x1."""

  def __init__(self, **kw):
    self.b0 = ConvBN(192, 96, 1, **kw)
    self.b1_0 = ConvBN(192, 48, 1, **kw)
    self.b1_1 = ConvBN(48, 64, 5, **kw)
    self.b2_0 = ConvBN(192, 64, 1, **kw)
    self.b2_1 = ConvBN(64, 96, 3, **kw)
    self.b2_2 = ConvBN(96, 96, 3, **kw)
    self.b3 = ConvBN(192, 64, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b0 = self.b0(x)
    b1 = self.b1_1(self.b1_0(x))
    b2 = self.b2_2(self.b2_1(self.b2_0(x)))
    # Keras/TF 'same' average pooling divides by the number of real (unpadded) pixels.
    pool = nnx.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)
    return jnp.concatenate([b0, b1, b2, self.b3(pool)], axis=-1)

  def keras_order(self) -> list[ConvBN]:
    return [self.b0, self.b1_0, self.b1_1, self.b2_0, self.b2_1, self.b2_2, self.b3]


# (branches as lists of (filters, kernel)) for each residual block type, as in Keras.
_BLOCK_BRANCHES = {
    "block35": [[(32, 1)], [(32, 1), (32, 3)], [(32, 1), (48, 3), (64, 3)]],
    "block17": [[(192, 1)], [(128, 1), (160, (1, 7)), (192, (7, 1))]],
    "block8": [[(192, 1)], [(192, 1), (224, (1, 3)), (256, (3, 1))]],
}
_BLOCK_CHANNELS = {"block35": 320, "block17": 1088, "block8": 2080}


class ResidualBlock(nnx.Module):
  """Keras `inception_resnet_block`: x + scale * up(concat(branches)), then ReLU."""

  def __init__(self, block_type: str, scale: float, *, act: bool = True, dtype,
               param_dtype, rngs: nnx.Rngs):
    channels = _BLOCK_CHANNELS[block_type]
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    branches = []
    for spec in _BLOCK_BRANCHES[block_type]:
      convs, cin = [], channels
      for filters, kernel in spec:
        convs.append(ConvBN(cin, filters, kernel, **kw))
        cin = filters
      branches.append(nnx.List(convs))
    self.branches = nnx.List(branches)
    mixed = sum(spec[-1][0] for spec in _BLOCK_BRANCHES[block_type])
    self.up = nnx.Conv(mixed, channels, (1, 1), use_bias=True, **kw)
    self.scale = float(scale)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    outs = []
    for branch in self.branches:
      y = x
      for conv in branch:
        y = conv(y)
      outs.append(y)
    x = x + self.up(jnp.concatenate(outs, axis=-1)) * self.scale
    return nnx.relu(x) if self.act else x

  def keras_order(self) -> list[ConvBN]:
    return [conv for branch in self.branches for conv in branch]


class Mixed6a(nnx.Module):
  """320 -> 1088 channels at half resolution: 3x3/2 | 1x1,3x3,3x3/2 | maxpool."""

  def __init__(self, **kw):
    self.b0 = ConvBN(320, 384, 3, strides=2, padding="valid", **kw)
    self.b1_0 = ConvBN(320, 256, 1, **kw)
    self.b1_1 = ConvBN(256, 256, 3, **kw)
    self.b1_2 = ConvBN(256, 384, 3, strides=2, padding="valid", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.b1_2(self.b1_1(self.b1_0(x)))
    return jnp.concatenate([self.b0(x), b1, _max_pool_valid(x)], axis=-1)

  def keras_order(self) -> list[ConvBN]:
    return [self.b0, self.b1_0, self.b1_1, self.b1_2]


class Mixed7a(nnx.Module):
  """1088 -> 2080 channels at half resolution: three conv branches and a maxpool."""

  def __init__(self, **kw):
    self.b0_0 = ConvBN(1088, 256, 1, **kw)
    self.b0_1 = ConvBN(256, 384, 3, strides=2, padding="valid", **kw)
    self.b1_0 = ConvBN(1088, 256, 1, **kw)
    self.b1_1 = ConvBN(256, 288, 3, strides=2, padding="valid", **kw)
    self.b2_0 = ConvBN(1088, 256, 1, **kw)
    self.b2_1 = ConvBN(256, 288, 3, **kw)
    self.b2_2 = ConvBN(288, 320, 3, strides=2, padding="valid", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b0 = self.b0_1(self.b0_0(x))
    b1 = self.b1_1(self.b1_0(x))
    b2 = self.b2_2(self.b2_1(self.b2_0(x)))
    return jnp.concatenate([b0, b1, b2, _max_pool_valid(x)], axis=-1)

  def keras_order(self) -> list[ConvBN]:
    return [self.b0_0, self.b0_1, self.b1_0, self.b1_1, self.b2_0, self.b2_1, self.b2_2]


class InceptionResNetV2(nnx.Module):
  """Inception-ResNet-v2: logits (B, num_classes), or features (B, h, w, 1536) without top.

  The top is global average pooling, dropout (rate `dropout`, only in train mode) and a
  Dense layer. Logits and features are float32 whatever the compute dtype.
  """

  @linear_init  # the whole network's construction stays linear when traced
  def __init__(self, *, in_channels: int = 3, num_classes: int = 1, include_top: bool = True,
               dropout: float = 0.0, blocks: tuple[int, int, int] = BLOCKS,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if int(in_channels) not in (1, 3):
      raise ValueError(f"InceptionResNetV2: in_channels={in_channels} must be 1 or 3")
    if include_top and int(num_classes) < 1:
      raise ValueError(f"InceptionResNetV2: num_classes={num_classes} must be >= 1")
    if not 0.0 <= float(dropout) < 1.0:
      raise ValueError(f"InceptionResNetV2: dropout={dropout} must be in [0, 1)")
    n35, n17, n8 = (int(b) for b in blocks)
    if len(tuple(blocks)) != 3 or min(n35, n17, n8) < 1:
      raise ValueError(f"InceptionResNetV2: blocks={tuple(blocks)} must be three counts >= 1 "
                       f"(block35, block17, block8; {BLOCKS} is the published network)")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.in_channels = int(in_channels)
    self.stem = Stem(self.in_channels, **kw)
    self.mixed_5b = Mixed5b(**kw)
    self.block35 = nnx.List([ResidualBlock("block35", 0.17, **kw) for _ in range(n35)])
    self.mixed_6a = Mixed6a(**kw)
    self.block17 = nnx.List([ResidualBlock("block17", 0.1, **kw) for _ in range(n17)])
    self.mixed_7a = Mixed7a(**kw)
    self.block8 = nnx.List([ResidualBlock("block8", 0.2, **kw) for _ in range(n8 - 1)]
                           + [ResidualBlock("block8", 1.0, act=False, **kw)])
    self.conv_7b = ConvBN(2080, 1536, 1, **kw)
    self.include_top = bool(include_top)
    if self.include_top:
      self.dropout = nnx.Dropout(float(dropout), rngs=rngs) if dropout > 0 else None
      self.head = nnx.Linear(1536, int(num_classes), **kw)

  def features(self, x: jax.Array) -> jax.Array:
    """(B, H, W, in_channels) -> (B, h, w, 1536) in the compute dtype."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"InceptionResNetV2 expects (B, H, W, {self.in_channels}) input, "
                       f"got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"InceptionResNetV2 needs inputs of at least {MIN_SIZE}x{MIN_SIZE} "
                       f"pixels, got {x.shape[1]}x{x.shape[2]}")
    x = self.mixed_5b(self.stem(x.astype(self.dtype)))
    for block in self.block35:
      x = block(x)
    x = self.mixed_6a(x)
    for block in self.block17:
      x = block(x)
    x = self.mixed_7a(x)
    for block in self.block8:
      x = block(x)
    return self.conv_7b(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.features(x)
    if not self.include_top:
      return x.astype(jnp.float32)
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout is not None:
      x = self.dropout(x)
    return self.head(x).astype(jnp.float32)

  def keras_order(self) -> list[ConvBN]:
    """The unnamed Keras conv2d_bn layers, in the order keras.applications creates them."""
    out = self.stem.keras_order() + self.mixed_5b.keras_order()
    out += [c for b in self.block35 for c in b.keras_order()]
    out += self.mixed_6a.keras_order()
    out += [c for b in self.block17 for c in b.keras_order()]
    out += self.mixed_7a.keras_order()
    out += [c for b in self.block8 for c in b.keras_order()]
    return out

  def keras_named(self) -> dict[str, nnx.Module]:
    """Keras's explicitly named layers: the blocks' 'up' convs and conv_7b."""
    named: dict[str, nnx.Module] = {}
    for kind, blocks in (("block35", self.block35), ("block17", self.block17),
                         ("block8", self.block8)):
      for i, block in enumerate(blocks):
        named[f"{kind}_{i + 1}_conv"] = block.up
    named["conv_7b"] = self.conv_7b
    return named
