"""Building blocks shared by the models."""

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` over the last axis, with a running-stat update that traces in O(1).

  Same constructor, variables (`scale`, `bias`, `mean`, `var`) and train/eval switch
  (`use_running_average`, set by `model.train()` / `model.eval()`) as nnx.BatchNorm.
  Why not nnx.BatchNorm itself: in flax 0.12 its `self.mean[...] = ...` update asks the
  tracer for `.sharding`, and jax answers with an error message that walks the whole
  trace so far; with the 204 norms of Inception-ResNet-v2 that made tracing a train step
  ~20 s slower (quadratic in depth). `set_value` skips that check.
  Statistics are computed in float32 whatever the compute dtype.
  """

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    if use_running_average is None:
      use_running_average = self.use_running_average
    axes = tuple(range(x.ndim - 1))
    if use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axes)
      # E[x^2] - E[x]^2 (one pass, as flax's use_fast_variance), clamped at 0.
      var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)
      m = self.momentum
      # set_value, not `[...] =`: see the class docstring.
      self.mean.set_value(jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean))
      self.var.set_value(jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var))
    mul = jax.lax.rsqrt(var + self.epsilon)
    if self.scale is not None:
      mul = mul * self.scale[...]
    dtype = self.dtype or x.dtype
    # (x - mean) first: folding the mean into the shift (x * mul + shift) cancels
    # catastrophically in bfloat16 when |mean| >> std. XLA fuses this into one pass.
    y = (x.astype(dtype) - mean.astype(dtype)) * mul.astype(dtype)
    return y if self.bias is None else y + self.bias[...].astype(dtype)
