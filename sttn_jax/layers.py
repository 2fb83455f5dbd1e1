"""Layers with the original PyTorch semantics, NHWC / HWIO: BatchNorm, PReLU, convolutions (full
precision, folded binary pair, ternary in int8 for inference) and the linear classifier.
`dtype` is the computation dtype; parameters are created in float32 (`param_dtype`) and cast at
use, so bfloat16 compute keeps float32 master weights and statistics.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ops import fold_binary_pair
from sttn_jax.batch_statistics import BN_STATS, FOLD_MIN_ROWS, batch_norm_train, folded_statistics
from sttn_jax.convolutions import CONV_FORMS, conv2d, conv2d_as_dot

Dtype = Any
# Name of the convolutions' outputs that training with remat keeps (`models.REMAT_POLICY`).
CONV_OUT = "conv_out"


def normal_std_over_fan_in(key, shape, dtype=jnp.float32):
    """The original student init: Normal(0, std = 1 / fan_in), fan_in = product of all but the last
    axis (in * kh * kw for an HWIO kernel, in for a Dense kernel). Std, not variance."""
    return jax.random.normal(key, shape, dtype) / math.prod(shape[:-1])


def torch_default_bias(fan_in: int) -> Callable:
    """PyTorch's default Conv2d/Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return functools.partial(jax.random.uniform, minval=-bound, maxval=bound)


class BatchNorm(nn.Module):
    """nn.BatchNorm2d semantics: training normalises with the biased batch variance and puts the
    unbiased one (n / (n - 1)) into the running average; momentum 0.1 weighs the new batch.
    `axis_name`: batch statistics averaged over that mapped axis (synchronised BatchNorm; equal
    per-device batches assumed). `num_batches_tracked` is kept so checkpoints round-trip."""
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool, conv_kernel=None, input_bias=None):
        """BatchNorm of x, or of x + `input_bias` (a per-channel shift, such as the bias of the
        convolution before it: training's normalisation cancels it exactly, so there it moves the
        running mean only and has gradient 0); or, given `conv_kernel` (1x1 HWIO, stride 1, no
        bias), of that convolution of x, as one convolution with the normalisation folded into its
        kernel and a bias: the batch statistics come from x's mean and second moments, so the
        output is written once, normalised (`folded_statistics`)."""
        if conv_kernel is not None and input_bias is not None:
            raise ValueError("a folded 1x1 convolution has no bias: give conv_kernel or input_bias")
        c = x.shape[-1] if conv_kernel is None else conv_kernel.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), self.param_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), self.param_dtype))
        tracked = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        sdt = jnp.promote_types(self.dtype, jnp.float32)  # bfloat16 statistics are too coarse
        if input_bias is not None and not train:  # added as the convolution adds its own bias
            x, input_bias = x + input_bias.astype(self.dtype), None
        centre = ra_mean.value if input_bias is None else ra_mean.value - input_bias  # x's
        if conv_kernel is not None:  # the kernel as the convolution computes with it
            conv_kernel = conv_kernel.astype(self.dtype)
            if train and math.prod(x.shape[:-1]) < FOLD_MIN_ROWS * x.shape[-1]:  # not worth it
                x, conv_kernel = conv2d(x.astype(self.dtype), conv_kernel, 1, 0), None
        xs, m = x.astype(sdt), self.momentum
        if train:
            n = math.prod(x.shape[:-1]) * (1 if self.axis_name is None else lax.psum(1, self.axis_name))
            if isinstance(n, int) and n < 2:
                raise ValueError(f"BatchNorm in training needs more than one value per channel, "
                                 f"got input of shape {x.shape}; use a larger batch or image")
            if conv_kernel is not None:
                mean, var = folded_statistics(x.astype(self.dtype), conv_kernel, self.axis_name)
                # Named for remat (`sttn_jax.models.REMAT_POLICY`): its backward pass keeps these
                # two numbers per channel and recomputes the normalisation from the saved input.
                mean, var = checkpoint_name(mean, BN_STATS), checkpoint_name(var, BN_STATS)
                new_mean = (1 - m) * ra_mean.value + m * mean
            else:  # scale and bias as varying as x: the rule returns this device's sums
                like_x = jnp.zeros_like(xs[(0,) * (x.ndim - 1)])
                y, moments = batch_norm_train(
                    x, lax.stop_gradient(centre.astype(sdt)), scale.astype(sdt) + like_x,
                    bias.astype(sdt) + like_x, self.axis_name, self.epsilon)
                # the batch mean is centre + moments[0], so the running mean moves by m * moments[0]:
                # both averages from the one array (XLA updates them in one kernel)
                var = jnp.maximum(moments[1] - jnp.square(moments[0]), 0)
                new_mean = ra_mean.value + m * moments[0]
            if not self.is_initializing():  # each statistic keeps its dtype (float64 in parity)
                ra_mean.value = new_mean.astype(ra_mean.value.dtype)
                unbiased = var * (n / (n - 1))
                ra_var.value = ((1 - m) * ra_var.value + m * unbiased).astype(ra_var.value.dtype)
                tracked.value = tracked.value + 1
            if conv_kernel is None:
                return y.astype(self.dtype)
        else:
            mean, var = centre.astype(sdt), ra_var.value.astype(sdt)
        inv = lax.rsqrt(var + self.epsilon) * scale.astype(sdt)
        if conv_kernel is not None:
            kernel = (conv_kernel.astype(sdt) * inv).astype(self.dtype)
            return conv2d(x.astype(self.dtype), kernel, 1, 0) + (
                bias.astype(sdt) - mean * inv).astype(self.dtype)
        return ((xs - mean) * inv + bias.astype(sdt)).astype(self.dtype)


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
    """nn.Conv2d in NHWC: full-precision kernel, optional bias, PyTorch padding; `form` one of
    CONV_FORMS (the same sums)."""
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = normal_std_over_fan_in
    form: str = "conv"

    @nn.compact
    def __call__(self, x, batch_norm: Callable | None = None):
        """conv(x), or with `batch_norm` (a BatchNorm module's bound call, `train` given) that
        BatchNorm of it, folded into this 1x1 convolution (`BatchNorm.__call__`'s conv_kernel)."""
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features),
                            self.param_dtype)
        if batch_norm is not None:
            if (k, self.stride, self.padding, self.use_bias) != (1, 1, 0, False):
                raise ValueError("only a 1x1 stride-1 convolution without bias or padding folds "
                                 "its BatchNorm")
            return batch_norm(x, conv_kernel=kernel)
        y = CONV_FORMS[self.form](x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                                  self.padding)
        y = checkpoint_name(y, CONV_OUT)
        if self.use_bias:
            bias = self.param("bias", torch_default_bias(cin * k * k), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class _BlockConv(nn.Module):
    """The fields of the block convolutions (3x3, padding 1)."""
    features: int
    stride: int = 1
    kernel_size: int = 3
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class Int8TernaryConv(_BlockConv):
    """A merged ternary convolution for inference, in integers: int8 activations in {-1, 0, +1}
    times int8 `codes` in {-2, ..., 2} (HWIO), accumulated in int32 (exact: no rounding inside the
    sum), then the per-output-channel float32 `scale` and the `bias` in `dtype`. With the codes and
    scale of `sttn_jax.quantize.int8_variables` (codes * scale == kernel) this is the float layer's
    convolution with one rounding for the scale and one for the bias, not one per term of the sum.
    """

    @nn.compact
    def __call__(self, x):
        if x.dtype != jnp.int8:
            raise ValueError(f"{type(self).__name__} takes int8 ternary activations, got {x.dtype}; "
                             "cast the ternary activation with .astype(jnp.int8)")
        if self.has_variable("params", "kernel"):
            raise ValueError(f"{'/'.join(self.scope.path)} holds a float kernel: convert the merged "
                             "variables with sttn_jax.quantize.int8_variables for the int8 model")
        shape = (self.kernel_size,) * 2 + (x.shape[-1], self.features)
        codes = self.param("codes", nn.initializers.zeros, shape, jnp.int8)
        scale = self.param("scale", nn.initializers.zeros, (self.features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        codes = codes.astype(jnp.int8)
        if min(x.shape[1:3]) < self.kernel_size:  # no int8 GPU kernel as a convolution: a product
            acc = conv2d_as_dot(x, codes, self.stride, self.padding,
                                preferred_element_type=jnp.int32)
        else:
            acc = conv2d(x, codes, self.stride, self.padding, preferred_element_type=jnp.int32)
        # int32 -> float32 right after the convolution (exact: |acc| <= 2 * 9 * 512 < 2 ** 24): the
        # form of integer convolution XLA's GPU backend supports (it refuses a bare int32 result).
        # The scale applies in float32 (or wider), so that a bfloat16 model rounds the product once
        # instead of the sum, the scale and the product each.
        sdt = jnp.promote_types(self.dtype, jnp.float32)
        y = acc.astype(jnp.float32).astype(sdt) * scale.astype(sdt)
        return y.astype(self.dtype) + bias.astype(self.dtype)


class BinaryPairConv(_BlockConv):
    """The original's pair (convK_1, convK_2) of binary convolutions, run as ONE convolution: the
    latent kernels `kernel_1`, `kernel_2` fold into T = alpha (sign W1 + sign W2)
    (`ops.fold_binary_pair`) and the biases add, b1 + b2: the two convolutions' sum in half the
    work, with the original gradients for all four parameters."""

    @nn.compact
    def __call__(self, x, batch_norm: Callable | None = None):
        """conv(x), or with `batch_norm` (a BatchNorm module's bound call, `train` given) that
        BatchNorm of it, which takes the biases as its input's shift (`BatchNorm`'s input_bias)."""
        k, cin = self.kernel_size, x.shape[-1]
        shape, bias_init = (k, k, cin, self.features), torch_default_bias(cin * k * k)
        w1 = self.param("kernel_1", normal_std_over_fan_in, shape, self.param_dtype)
        b1 = self.param("bias_1", bias_init, (self.features,), self.param_dtype)
        w2 = self.param("kernel_2", normal_std_over_fan_in, shape, self.param_dtype)
        b2 = self.param("bias_2", bias_init, (self.features,), self.param_dtype)
        kernel = fold_binary_pair(w1, w2).astype(self.dtype)
        y = checkpoint_name(conv2d(x.astype(self.dtype), kernel, self.stride, self.padding), CONV_OUT)
        if batch_norm is not None:
            return batch_norm(y, input_bias=b1 + b2)
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
