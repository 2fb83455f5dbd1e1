"""The ways to compute a convolution with PyTorch's arithmetic in NHWC / HWIO, all the same sums
(`CONV_FORMS`): they differ in the GPU kernels XLA makes of them."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ops.pooling import output_size, window_views


def conv2d(x, kernel, stride: int, padding: int, **kwargs):
    """PyTorch Conv2d arithmetic (symmetric explicit padding) in NHWC/HWIO."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs)


def conv2d_as_dot(x, kernel, stride: int, padding: int, **kwargs):
    """`conv2d(x, kernel, stride, padding)` as one matrix product over the k*k shifted windows of
    the padded input (im2col): the same sums. `kwargs` go to `jnp.dot` (`preferred_element_type`).
    Used for int8 inputs smaller than the kernel, which XLA's GPU backend rewrites into a
    convolution that cuDNN has no int8 kernel for (seen compiling for sm_90: "Can't lower one or
    more integer convolutions"); such maps are at most 2x2, so the k*k copies cost nothing."""
    k, c = kernel.shape[0], x.shape[-1]
    # the windows in HWIO order of the kernel's rows: (n, oh, ow, k * k * c)
    patches = jnp.concatenate(window_views(x, k, stride, padding), axis=-1)
    return jnp.dot(patches, kernel.reshape(k * k * c, -1), **kwargs)


def conv2d_space_to_depth(x, kernel, stride: int, padding: int):
    """`conv2d(x, kernel, 2, padding)` as a stride-1 convolution without padding over the padded
    input's 2x2 blocks stacked into 4x the channels, the kernel (zero-padded to an even size)
    stacked alike: the same products, summed in another order. Stride 2 only."""
    if stride != 2:
        raise ValueError(f"conv2d_space_to_depth computes stride-2 convolutions, not stride "
                         f"{stride}")
    n, h, w, c = x.shape
    k, o = kernel.shape[0], kernel.shape[-1]
    oh, ow = output_size(x, k, stride, padding)
    x = jnp.pad(x, ((0, 0), (padding, padding + h % 2), (padding, padding + w % 2), (0, 0)))
    hb, wb = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(n, hb, 2, wb, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hb, wb, 4 * c)
    kb = (k + 1) // 2
    kernel = jnp.pad(kernel, ((0, 2 * kb - k), (0, 2 * kb - k), (0, 0), (0, 0)))
    kernel = kernel.reshape(kb, 2, kb, 2, c, o).transpose(0, 2, 1, 3, 4, 5)
    kernel = kernel.reshape(kb, kb, 4 * c, o)
    # the blocks' extra row and column (odd sizes, or padding past the last window) are cut off
    return conv2d(x, kernel, 1, 0)[:, :oh, :ow]


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def conv2d_im2col(x, kernel, stride: int, padding: int):
    """`conv2d_as_dot` whose backward pass rebuilds the patches from `x` instead of keeping them
    (XLA's H100 plan of the bfloat16 training step with it as the stems: 0.8 GiB less at the peak,
    1.2 GB more moved)."""
    return conv2d_as_dot(x, kernel, stride, padding)


# The ways `Conv` can compute its convolution, all the same sums. They differ in the GPU kernels
# they become: a 7x7 stride-2 convolution over 3 channels (the stem) ran at ~34 TFLOP/s in cuDNN on
# an H200 (docs/performance.md); space-to-depth makes it a 4x4 one over 12 channels, im2col a matrix
# product with rows of 147.
CONV_FORMS = {"conv": conv2d, "space_to_depth": conv2d_space_to_depth, "im2col": conv2d_im2col}
