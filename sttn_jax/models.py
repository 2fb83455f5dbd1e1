"""Flax (linen) models: STTN ResNet-18 in its training form (binary pairs) and its merged ternary
form, and the torchvision ResNet-50 used as the distillation teacher.

Module and parameter names mirror the PyTorch modules (`features_4/conv1` is the pair
`features.4.conv1_1` + `features.4.conv1_2`), so `sttn_jax.interop` maps checkpoints by name.
Images are NHWC; all models pool globally, so any input from 32x32 up works (224x224 gives the
original's 7x7 map before pooling).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ops import max_pool, ternary_activation
from sttn_jax.archs import (BWX2, FIRST_BLOCK_INDEX, MIN_IMAGE_SIZE, RESNET18_BLOCKS, TEACHER,
                            TERNARY, check_arch, check_images, inference_dtype_problem,
                            stem_conv_problem)
from sttn_jax.layers import (BN_STATS, CONV_OUT, BatchNorm, BinaryPairConv, Conv, Dense, Dtype,
                             Int8TernaryConv, PReLU)

# With remat, the stem and each block run under jax.checkpoint, and their backward pass keeps only
# their input and these values: convolution outputs, the residual sum before a block's first PReLU
# and BatchNorm's statistics. BatchNorm's normalisation, the ternary activations and their masks,
# PReLU and pooling are recomputed from them (elementwise work; docs/performance.md has the bytes).
BLOCK_SUM = "block_sum"
SAVED_FOR_BACKWARD = (CONV_OUT, BLOCK_SUM, BN_STATS)
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(*SAVED_FOR_BACKWARD)


class STTNBasicBlock(nn.Module):
    """The original Bi-Real-style block; `ternary_weights` picks the merged (one conv) form,
    `inference_dtype="int8"` its integer form (int8 activations and codes, int32 accumulation)."""
    in_channels: int
    out_channels: int
    stride: int
    ternary_weights: bool = False
    dtype: Dtype = jnp.float32
    act_backend: str = "auto"
    bn_axis_name: str | None = None
    inference_dtype: str | None = None

    def _conv(self, name, stride):
        if self.inference_dtype == "int8":
            return Int8TernaryConv(self.out_channels, stride, dtype=self.dtype, name=name)
        if self.ternary_weights:
            return Conv(self.out_channels, 3, stride, 1, use_bias=True, dtype=self.dtype, name=name)
        return BinaryPairConv(self.out_channels, stride, dtype=self.dtype, name=name)

    def _bn(self, name):
        return BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name=name)

    def _conv_bn(self, conv_name, bn_name, stride, x, train):
        """BatchNorm of a block convolution; a binary pair hands its bias to the BatchNorm."""
        conv, bn = self._conv(conv_name, stride), self._bn(bn_name)
        if isinstance(conv, BinaryPairConv):
            return conv(x, batch_norm=functools.partial(bn, train=train))
        return bn(conv(x), train)

    def _activation(self, x):
        out = ternary_activation(x, self.act_backend)
        return out.astype(jnp.int8) if self.inference_dtype == "int8" else out  # exact: -1, 0, 1

    @nn.compact
    def __call__(self, x, train: bool):
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"block expects {self.in_channels} channels, got {x.shape[-1]}")
        out = self._activation(self._bn("bn1")(x, train))
        shortcut = x
        if self.stride == 2:  # halve the map, zeros for the new channels
            shortcut = jnp.pad(max_pool(x, 2, 2), ((0, 0),) * 3 + ((0, x.shape[-1]),))
        out = self._conv_bn("conv1", "bn_add1", self.stride, out, train) + shortcut
        mid = PReLU(dtype=self.dtype, name="prelu1")(checkpoint_name(out, BLOCK_SUM))
        out = self._activation(self._bn("bn2")(mid, train))
        out = self._conv_bn("conv2", "bn_add2", 1, out, train) + mid
        return PReLU(dtype=self.dtype, name="prelu2")(out)


class STTNResNet18(nn.Module):
    """`resnet18_bwx2` (ternary_weights=False) and `resnet18_ter` (True) of the original;
    inference_dtype, remat and stem_conv: see `create`."""
    num_classes: int = 1000
    ternary_weights: bool = False
    dtype: Dtype = jnp.float32
    act_backend: str = "auto"
    bn_axis_name: str | None = None
    inference_dtype: str | None = None
    remat: bool = False
    stem_conv: str = "conv"

    def stem(self, x, train: bool):
        """features.0-3: the full-precision 7x7 convolution, BatchNorm, PReLU and max pooling."""
        x = Conv(64, 7, 2, 3, use_bias=False, dtype=self.dtype, form=self.stem_conv,
                 name="features_0")(x)
        x = BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name="features_1")(x, train)
        x = PReLU(dtype=self.dtype, name="features_2")(x)
        return max_pool(x, 3, 2, 1)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, BWX2)
        if train and self.inference_dtype == "int8":
            raise ValueError("the int8 model is for inference only: call it with train=False, or "
                             "train the resnet18_bwx2 model and merge it")
        stem, block = type(self).stem, STTNBasicBlock
        if self.remat:  # one checkpoint each: a block recomputes only when its gradient is due
            stem = nn.remat(stem, static_argnums=(2,), policy=REMAT_POLICY)
            block = nn.remat(block, static_argnums=(2,), policy=REMAT_POLICY)
        x = stem(self, x.astype(self.dtype), train)
        for i, (cin, cout, stride) in enumerate(RESNET18_BLOCKS):
            x = block(cin, cout, stride, self.ternary_weights, self.dtype, self.act_backend,
                      self.bn_axis_name, inference_dtype=self.inference_dtype,
                      name=f"features_{FIRST_BLOCK_INDEX + i}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


# torchvision's ResNet conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# nn.Linear's default weight init, U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5)).
torch_linear_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


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
        # bn3 folded into conv3: XLA makes the sum with x and relu part of the convolution
        out = conv(self.planes * 4, 1, 1, 0, "conv3")(out, functools.partial(bn("bn3"), train=train))
        if self.downsample:
            x = bn("downsample_1")(conv(out.shape[-1], 1, self.stride, 0, "downsample_0")(x), train)
        return nn.relu(out + x)


class ResNet50(nn.Module):
    """torchvision.models.resnet50 layout (the distillation teacher), NHWC."""
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    stem_conv: str = "conv"

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, TEACHER)
        x = x.astype(self.dtype)
        x = Conv(64, 7, 2, 3, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
                 form=self.stem_conv, name="conv1")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name="bn1")(x, train))
        x = max_pool(x, 3, 2, 1)
        for stage, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):  # the first block of a stage projects: 4x the channels
                stride = 2 if (stage > 0 and b == 0) else 1
                x = Bottleneck(64 * 2 ** stage, stride, b == 0, self.dtype, self.bn_axis_name,
                               name=f"layer{stage + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_linear_kernel, name="fc")(x)


def create(arch: str, num_classes: int = 1000, dtype=jnp.float32, act_backend: str = "auto",
           bn_axis_name: str | None = None, inference_dtype: str | None = None,
           remat: bool = False, stem_conv: str = "conv") -> nn.Module:
    """The Flax module for `arch` in archs.ARCHS. dtype: the computation dtype (bfloat16 for speed,
    float64 with jax x64 for parity checks; parameters are float32 either way). act_backend: see
    `ops.ternary_activation`. bn_axis_name: a mapped axis to synchronise BatchNorm statistics over.
    inference_dtype: None or "float" (an alias), or "int8" (resnet18_ter, eval only: the 16 block
    convolutions in integers, on `sttn_jax.quantize.int8_variables(variables)`). remat (the STTN
    ResNet-18s): the stem and every block under jax.checkpoint with REMAT_POLICY, for training:
    the same function (identical values in float64; float32 may round differently), about a
    quarter of the activation memory for the backward pass. stem_conv: how the 7x7 stem
    convolution is computed, a key of `convolutions.CONV_FORMS` (the same sums; a speed choice)."""
    check_arch(arch)
    if problem := stem_conv_problem(stem_conv):
        raise ValueError(f"unknown stem_conv {stem_conv!r}; {problem}")
    if problem := inference_dtype_problem(arch, inference_dtype):
        raise ValueError(f"inference_dtype={inference_dtype!r}: {problem}")
    if arch == TEACHER:
        return ResNet50(num_classes, dtype, bn_axis_name, stem_conv=stem_conv)
    return STTNResNet18(num_classes, arch == TERNARY, dtype, act_backend, bn_axis_name,
                        None if inference_dtype == "float" else inference_dtype, remat, stem_conv)


# How a module computes, which creates no variable: init_variables sets these to fixed values.
COMPUTE_SETTINGS = dict(dtype=jnp.float32, act_backend="xla", bn_axis_name=None, remat=False,
                        stem_conv="conv")


def init_variables(module: nn.Module, rng):
    """{'params', 'batch_stats'} for `module` (float32 parameters, the same for any input size).

    One compiled program per architecture and class count: it traces the module with
    COMPUTE_SETTINGS on one 32x32 image and without 64-bit types, so a float64, bfloat16, remat
    or 224x224 run loads the program an earlier run compiled from XLA's cache (compiling it takes
    4 to 12 s on a CPU: a random number generator per parameter), with values equal bit for bit."""
    module = module.clone(**{k: v for k, v in COMPUTE_SETTINGS.items() if hasattr(module, k)})
    try:
        program = _init_program(module)
    except TypeError:  # a module with an unhashable field (a list): traced for this call only
        program = _init_program.__wrapped__(module)
    with jax.enable_x64(False):
        return program(rng)


@functools.lru_cache(maxsize=None)
def _init_program(module: nn.Module):
    """The jitted init of `module` (modules compare by value), traced once per process: a repeated
    init_variables then takes 0.2 s instead of 1.1 s (ResNet-18 on a CPU, the program cached)."""
    # numpy's zeros: a constant, also where the first call is inside a trace (jax.eval_shape)
    x = np.zeros((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), np.float32)
    return jax.jit(lambda rng: module.init(rng, x, train=False))
