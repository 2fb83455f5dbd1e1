"""Layers with the original PyTorch semantics: BatchNorm, PReLU, convolutions (full precision,
folded binary pair, ternary, and the ternary one in int8 for inference) and the linear classifier,
all NHWC / HWIO.

`dtype` everywhere is the computation dtype; parameters are created in float32 (`param_dtype`)
and cast at use, so bfloat16 compute keeps float32 master weights and statistics.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ops import fold_binary_pair

Dtype = Any
PyTorchPadding = int


def normal_std_over_fan_in(key, shape, dtype=jnp.float32):
    """The original student init: Normal(0, std = 1 / fan_in), fan_in = product of all but the last
    axis (in * kh * kw for an HWIO kernel, in for a Dense kernel). Std, not variance."""
    fan_in = math.prod(shape[:-1])
    return jax.random.normal(key, shape, dtype) / fan_in


def torch_default_bias(fan_in: int) -> Callable:
    """PyTorch's default Conv2d/Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def statistics_dtype(dtype) -> Dtype:
    """BatchNorm statistics run in at least float32 (bfloat16 means/variances are too coarse)."""
    return jnp.promote_types(dtype, jnp.float32)


def conv2d(x, kernel, stride: int, padding: int):
    """PyTorch Conv2d arithmetic (symmetric explicit padding) in NHWC/HWIO."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nn.Module):
    """nn.BatchNorm2d semantics: training normalises with the biased batch variance and puts the
    unbiased one (n / (n - 1)) into the running average; momentum 0.1 weighs the new batch.

    With `axis_name` the batch statistics are averaged over that mapped axis (synchronised
    BatchNorm across data-parallel devices; equal per-device batches assumed).
    `num_batches_tracked` counts training batches, as PyTorch does, so checkpoints round-trip.
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), self.param_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), self.param_dtype))
        tracked = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        sdt = statistics_dtype(self.dtype)
        xs = x.astype(sdt)
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = jnp.mean(xs, axis=axes)
            n = math.prod(x.shape[:-1])
            if self.axis_name is not None:
                mean = lax.pmean(mean, self.axis_name)
                n = n * lax.psum(1, self.axis_name)
            var = jnp.mean(jnp.square(xs - mean), axis=axes)
            if self.axis_name is not None:
                var = lax.pmean(var, self.axis_name)
            if isinstance(n, int) and n < 2:
                raise ValueError(f"BatchNorm in training needs more than one value per channel, "
                                 f"got input of shape {x.shape}; use a larger batch or image")
            if not self.is_initializing():
                m = self.momentum
                unbiased = var * (n / (n - 1))
                # Keep each statistic's own dtype (float32, or float64 in parity checks).
                ra_mean.value = ((1 - m) * ra_mean.value + m * mean).astype(ra_mean.value.dtype)
                ra_var.value = ((1 - m) * ra_var.value + m * unbiased).astype(ra_var.value.dtype)
                tracked.value = tracked.value + 1
        else:
            mean, var = ra_mean.value.astype(sdt), ra_var.value.astype(sdt)
        inv = lax.rsqrt(var + self.epsilon) * scale.astype(sdt)
        y = (xs - mean) * inv + bias.astype(sdt)
        return y.astype(self.dtype)


class PReLU(nn.Module):
    """nn.PReLU(C): y = max(0, x) + slope * min(0, x), one slope per channel, 0.25 at init."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],), self.param_dtype)
        slope = slope.astype(self.dtype)
        return jnp.where(x >= 0, x, slope * x)


class Conv(nn.Module):
    """nn.Conv2d in NHWC: full-precision kernel, optional bias, PyTorch padding."""
    features: int
    kernel_size: int
    stride: int = 1
    padding: PyTorchPadding = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = normal_std_over_fan_in

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
        if self.use_bias:
            bias = self.param("bias", torch_default_bias(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Int8TernaryConv(nn.Module):
    """A merged ternary convolution for inference, in integers: int8 activations in {-1, 0, +1}
    times int8 codes in {-2, ..., 2}, accumulated in int32 (exact: no rounding inside the sum),
    then the per-output-channel `scale` and the bias in floating point (`dtype`).

    Parameters `codes` (HWIO int8), `scale` (float32) and `bias`, as
    `sttn_jax.quantize.int8_variables` makes them from a merged kernel: codes * scale == kernel,
    so this computes the float layer's convolution with one rounding for the scale (and one for
    the bias) instead of one per term of the sum.
    """
    features: int
    stride: int = 1
    kernel_size: int = 3
    padding: PyTorchPadding = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.dtype != jnp.int8:
            raise ValueError(f"{type(self).__name__} takes int8 ternary activations, got {x.dtype}; "
                             "cast the ternary activation with .astype(jnp.int8)")
        if self.has_variable("params", "kernel"):
            raise ValueError(f"{'/'.join(self.scope.path)} holds a float kernel: convert the merged "
                             "variables with sttn_jax.quantize.int8_variables for the int8 model")
        k = self.kernel_size
        codes = self.param("codes", nn.initializers.zeros, (k, k, x.shape[-1], self.features),
                           jnp.int8)
        scale = self.param("scale", nn.initializers.zeros, (self.features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        acc = lax.conv_general_dilated(
            x, codes.astype(jnp.int8), window_strides=(self.stride, self.stride),
            padding=((self.padding, self.padding), (self.padding, self.padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.int32)
        # int32 -> float32 right after the convolution (exact: |acc| <= 2 * 9 * 512 < 2 ** 24): the
        # form of integer convolution XLA's GPU backend supports (it refuses a bare int32 result)
        y = acc.astype(jnp.float32).astype(self.dtype)
        return y * scale.astype(self.dtype) + bias.astype(self.dtype)


class BinaryPairConv(nn.Module):
    """The original's pair (convK_1, convK_2) of binary convolutions, run as ONE convolution.

    Parameters: latent kernels `kernel_1`, `kernel_2` and biases `bias_1`, `bias_2`, as trained by
    the original. The forward folds the kernels into T = alpha (sign W1 + sign W2) with
    `ops.fold_binary_pair` and adds b1 + b2: the same output as the two convolutions added, half
    the work, and the original gradients for all four parameters.
    """
    features: int
    stride: int = 1
    kernel_size: int = 3
    padding: PyTorchPadding = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        shape = (k, k, x.shape[-1], self.features)
        fan_in = x.shape[-1] * k * k
        w1 = self.param("kernel_1", normal_std_over_fan_in, shape, self.param_dtype)
        b1 = self.param("bias_1", torch_default_bias(fan_in), (self.features,), self.param_dtype)
        w2 = self.param("kernel_2", normal_std_over_fan_in, shape, self.param_dtype)
        b2 = self.param("bias_2", torch_default_bias(fan_in), (self.features,), self.param_dtype)
        ternary_kernel = fold_binary_pair(w1, w2)
        y = conv2d(x.astype(self.dtype), ternary_kernel.astype(self.dtype), self.stride, self.padding)
        return y + (b1 + b2).astype(self.dtype)


class Dense(nn.Module):
    """nn.Linear: kernel (in, out), bias with PyTorch's default init."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = normal_std_over_fan_in

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", torch_default_bias(x.shape[-1]), (self.features,), self.param_dtype)
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)
