"""Flax (linen) models: STTN ResNet-18 in its training form (binary pairs) and its merged ternary
form, and the torchvision ResNet-50 used as the distillation teacher.

Module and parameter names mirror the PyTorch modules (`features_4/conv1` is the pair
`features.4.conv1_1` + `features.4.conv1_2`), so `sttn_jax.interop` maps checkpoints by name.
Images are NHWC; all models pool globally, so any input from 32x32 up works (224x224 gives the
original's 7x7 map before pooling).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ops import ternary_activation
from sttn_jax.layers import BatchNorm, BinaryPairConv, Conv, Dense, PReLU

Dtype = Any

ARCHS = ("resnet18_bwx2", "resnet18_ter", "resnet50")
# (in, out, stride) of the 8 BasicBlocks features.4 ... features.11.
RESNET18_BLOCKS = ((64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
                   (256, 256, 1), (256, 512, 2), (512, 512, 1))
FIRST_BLOCK_INDEX = 4


def max_pool_torch(x, window: int, stride: int, padding: int = 0):
    """nn.MaxPool2d: padding counts as -inf, floor output size."""
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


class STTNBasicBlock(nn.Module):
    """The original Bi-Real-style block; `ternary_weights` picks the merged (one conv) form."""
    in_channels: int
    out_channels: int
    stride: int
    ternary_weights: bool = False
    dtype: Dtype = jnp.float32
    act_backend: str = "auto"
    bn_axis_name: str | None = None

    def _conv(self, name, stride):
        if self.ternary_weights:
            return Conv(self.out_channels, 3, stride, 1, use_bias=True, dtype=self.dtype, name=name)
        return BinaryPairConv(self.out_channels, stride, dtype=self.dtype, name=name)

    def _bn(self, name):
        return BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name=name)

    @nn.compact
    def __call__(self, x, train: bool):
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"block expects {self.in_channels} channels, got {x.shape[-1]}")
        out = ternary_activation(self._bn("bn1")(x, train), self.act_backend)
        if self.stride == 2:
            shortcut = max_pool_torch(x, 2, 2)
            shortcut = jnp.concatenate([shortcut, jnp.zeros_like(shortcut)], axis=-1)
        else:
            shortcut = x
        out = self._bn("bn_add1")(self._conv("conv1", self.stride)(out), train) + shortcut
        out = PReLU(dtype=self.dtype, name="prelu1")(out)
        add = out
        out = ternary_activation(self._bn("bn2")(out, train), self.act_backend)
        out = self._bn("bn_add2")(self._conv("conv2", 1)(out), train) + add
        return PReLU(dtype=self.dtype, name="prelu2")(out)


class STTNResNet18(nn.Module):
    """`resnet18_bwx2` (ternary_weights=False) and `resnet18_ter` (True) of the original."""
    num_classes: int = 1000
    ternary_weights: bool = False
    dtype: Dtype = jnp.float32
    act_backend: str = "auto"
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        x = x.astype(self.dtype)
        x = Conv(64, 7, 2, 3, use_bias=False, dtype=self.dtype, name="features_0")(x)
        x = BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name="features_1")(x, train)
        x = PReLU(dtype=self.dtype, name="features_2")(x)
        x = max_pool_torch(x, 3, 2, 1)
        for i, (cin, cout, stride) in enumerate(RESNET18_BLOCKS):
            x = STTNBasicBlock(cin, cout, stride, self.ternary_weights, self.dtype, self.act_backend,
                               self.bn_axis_name, name=f"features_{FIRST_BLOCK_INDEX + i}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


ResNet18BWX2 = lambda **kw: STTNResNet18(ternary_weights=False, **kw)  # noqa: E731
ResNet18Ternary = lambda **kw: STTNResNet18(ternary_weights=True, **kw)  # noqa: E731


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
    """torchvision's ResNet conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu')."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")(key, shape, dtype)


def torch_linear_kernel(key, shape, dtype=jnp.float32):
    """nn.Linear's default weight init, U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")(key, shape, dtype)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (ResNet v1.5: stride on the 3x3 conv)."""
    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda f, k, s, p, name: Conv(f, k, s, p, use_bias=False, dtype=self.dtype,  # noqa: E731
                                              kernel_init=kaiming_normal_fan_out, name=name)
        bn = lambda name: BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name=name)  # noqa: E731
        out = nn.relu(bn("bn1")(conv(self.planes, 1, 1, 0, "conv1")(x), train))
        out = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, 1, "conv2")(out), train))
        out = bn("bn3")(conv(self.planes * 4, 1, 1, 0, "conv3")(out), train)
        identity = x
        if self.downsample:
            identity = bn("downsample_1")(conv(self.planes * 4, 1, self.stride, 0, "downsample_0")(x),
                                          train)
        return nn.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision.models.resnet50 layout (the distillation teacher), NHWC."""
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    stage_sizes: Sequence[int] = (3, 4, 6, 3)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        x = x.astype(self.dtype)
        x = Conv(64, 7, 2, 3, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
                 name="conv1")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name="bn1")(x, train))
        x = max_pool_torch(x, 3, 2, 1)
        in_planes = 64
        for stage, blocks in enumerate(self.stage_sizes):
            planes = 64 * 2 ** stage
            for b in range(blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                downsample = b == 0 and (stride != 1 or in_planes != planes * 4)
                x = Bottleneck(planes, stride, downsample, self.dtype, self.bn_axis_name,
                               name=f"layer{stage + 1}_{b}")(x, train)
                in_planes = planes * 4
        x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_linear_kernel, name="fc")(x)


MIN_IMAGE_SIZE = 32


def check_images(x):
    """Refuses input that is not a batch of NHWC RGB images of at least 32x32, naming the fix."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels (batch, height, width, 3), got shape "
                         f"{tuple(x.shape)}; transpose NCHW input with x.transpose(0, 2, 3, 1)")
    if min(x.shape[1], x.shape[2]) < MIN_IMAGE_SIZE:
        raise ValueError(f"images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} (the network "
                         f"downsamples 32x), got {x.shape[1]}x{x.shape[2]}")


def create(arch: str, num_classes: int = 1000, dtype=jnp.float32, act_backend: str = "auto",
           bn_axis_name: str | None = None) -> nn.Module:
    """The Flax module for `arch` in {"resnet18_bwx2", "resnet18_ter", "resnet50"}.

    dtype: computation dtype (float32; bfloat16 for speed; float64 with jax x64 for parity checks).
    Parameters are created in float32 either way. act_backend: see `ops.ternary_activation`.
    bn_axis_name: a mapped axis over which BatchNorm statistics are synchronised in training.
    """
    if arch == "resnet18_bwx2":
        return STTNResNet18(num_classes, False, dtype, act_backend, bn_axis_name)
    if arch == "resnet18_ter":
        return STTNResNet18(num_classes, True, dtype, act_backend, bn_axis_name)
    if arch == "resnet50":
        return ResNet50(num_classes, dtype, bn_axis_name)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def init_variables(module: nn.Module, rng, image_size: int = 224, batch: int = 1):
    """{'params', 'batch_stats'} for `module`, created from a dummy batch (float32 parameters)."""
    import jax

    x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    return jax.jit(lambda r: module.init(r, x, train=False))(rng)
