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
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name

from ops import max_pool, ternary_activation
from sttn_jax.errors import CheckpointError, ConfigError
from sttn_jax.layers import (BN_STATS, CONV_FORMS, CONV_OUT, BatchNorm, BinaryPairConv, Conv, Dense,
                             Dtype, Int8TernaryConv, PReLU)

BWX2, TERNARY, TEACHER = "resnet18_bwx2", "resnet18_ter", "resnet50"
# The architectures by name: what `create` builds, every tool accepts and every message lists.
ARCHS = {
    BWX2: "STTN ResNet-18 with binary weight pairs, as trained",
    TERNARY: "STTN ResNet-18 with the pairs merged into ternary weights",
    TEACHER: "torchvision's ResNet-50, the distillation teacher",
}
# (in, out, stride) of the 8 BasicBlocks features.4 ... features.11.
RESNET18_BLOCKS = ((64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
                   (256, 256, 1), (256, 512, 2), (512, 512, 1))
FIRST_BLOCK_INDEX = 4
MIN_IMAGE_SIZE = 32
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
        out = self._bn("bn_add1")(self._conv("conv1", self.stride)(out), train) + shortcut
        mid = PReLU(dtype=self.dtype, name="prelu1")(checkpoint_name(out, BLOCK_SUM))
        out = self._activation(self._bn("bn2")(mid, train))
        out = self._bn("bn_add2")(self._conv("conv2", 1)(out), train) + mid
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
        out = bn("bn3")(conv(self.planes * 4, 1, 1, 0, "conv3")(out), train)
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


def check_images(x, arch: str):
    """Refuses input that is not a batch of NHWC RGB images whose sides `arch` takes
    (`image_size_problem`), naming the fix; the shape error JAX would raise instead names neither
    the cause nor the fix."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels (batch, height, width, 3), got shape "
                         f"{tuple(x.shape)}; transpose NCHW input with x.transpose(0, 2, 3, 1)")
    for side in x.shape[1:3]:
        if problem := image_size_problem(side, arch):
            raise ValueError(f"images of {x.shape[1]}x{x.shape[2]}: {problem}")


def image_size_problem(side: int, arch: str = BWX2) -> str | None:
    """Why `arch` cannot take images `side` pixels high or wide, naming sides that fit; None if
    it can. Every model halves the image five times; the STTN ResNet-18's stride-2 blocks must
    also add their two paths (`odd_map_problem`), which also bounds its teacher, as that sees the
    student's images. ResNet-50 on its own takes any side of 32 or more: its shortcuts are
    strided convolutions, which halve as its main path does."""
    if side < MIN_IMAGE_SIZE:
        return (f"images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} (the network "
                f"downsamples 32x), a side of {side} is less; multiples of 32 fit, e.g. 32 or 64")
    return None if arch == TEACHER else odd_map_problem(side)


def odd_map_problem(side: int) -> str | None:
    """Why the STTN ResNet-18 cannot take images `side` pixels high or wide, and which sides it
    can; None if it can. A stride-2 block adds its convolution's output, whose side is the half
    rounded up, to its 2x2 max-pool shortcut, rounded down: an odd side there cannot be added, in
    the original either (except 3, where the 1-pixel shortcut broadcasts, as in PyTorch)."""
    m = -(-side // 4)  # the stem's stride-2 convolution and max pool each round the half up
    for *_, stride in RESNET18_BLOCKS:
        if stride == 2:
            if m % 2 and m != 3:
                near = [k for k in (side // 32 * 32, side // 32 * 32 + 32) if k >= MIN_IMAGE_SIZE]
                return (f"a side of {side} reaches a stride-2 block as {m} pixels, which its "
                        f"convolution halves to {m // 2 + 1} and its max-pool shortcut to "
                        f"{m // 2}; multiples of 32 fit, e.g. {' or '.join(map(str, near))}")
            m = -(-m // 2)
    return None


def create(arch: str, num_classes: int = 1000, dtype=jnp.float32, act_backend: str = "auto",
           bn_axis_name: str | None = None, inference_dtype: str | None = None,
           remat: bool = False, stem_conv: str = "conv") -> nn.Module:
    """The Flax module for `arch`, one of ARCHS. dtype: the computation dtype (bfloat16 for speed,
    float64 with jax x64 for parity checks; parameters are float32 either way). act_backend: see
    `ops.ternary_activation`. bn_axis_name: a mapped axis to synchronise BatchNorm statistics over.
    inference_dtype: None or "float" (an alias), or "int8" (resnet18_ter, eval only: the 16 block
    convolutions in integers, on `sttn_jax.quantize.int8_variables(variables)`). remat (the STTN
    ResNet-18s): the stem and every block under jax.checkpoint with REMAT_POLICY, for training:
    the same function (identical values in float64; float32 may round differently), about a
    quarter of the activation memory for the backward pass. stem_conv: how the 7x7 stem
    convolution is computed, a key of `layers.CONV_FORMS` (the same sums; a speed choice)."""
    check_arch(arch)
    if stem_conv not in CONV_FORMS:
        raise ValueError(f"unknown stem_conv {stem_conv!r}; choose one of {', '.join(CONV_FORMS)}")
    if inference_dtype not in (None, "float", "int8"):
        raise ValueError(f"unknown inference_dtype {inference_dtype!r}; choose None (float) or 'int8'")
    if inference_dtype == "int8" and arch != TERNARY:
        raise ValueError(f"inference_dtype='int8' needs the merged ternary model: create "
                         f"'resnet18_ter' (merge a resnet18_bwx2 with merge.py), not {arch!r}")
    if arch == TEACHER:
        return ResNet50(num_classes, dtype, bn_axis_name, stem_conv=stem_conv)
    return STTNResNet18(num_classes, arch == TERNARY, dtype, act_backend, bn_axis_name,
                        None if inference_dtype == "float" else inference_dtype, remat, stem_conv)


# How a module computes, which creates no variable: init_variables sets these to fixed values.
COMPUTE_SETTINGS = dict(dtype=jnp.float32, act_backend="xla", bn_axis_name=None, remat=False,
                        stem_conv="conv")


def init_variables(module: nn.Module, rng, image_size: int | None = None, batch: int | None = None):
    """{'params', 'batch_stats'} for `module` (float32 parameters, the same for any input size:
    `image_size` and `batch`, the dummy input of earlier versions, are accepted and unused).

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


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def arch_of(params) -> str | None:
    """The arch a parameter tree belongs to, from its structure (None if none)."""
    keys = traverse_util.flatten_dict(dict(params), sep="/") if hasattr(params, "keys") else {}
    return (BWX2 if "features_4/conv1/kernel_1" in keys else
            TERNARY if "features_4/conv1/kernel" in keys else
            TEACHER if "layer1_0/conv1/kernel" in keys else None)


def num_classes_of(params) -> int:
    return int(np.shape(params["fc"]["kernel"])[-1])


def _floating(leaf) -> bool:
    """Whether an array (or an abstract one) is floating point, bfloat16 included."""
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return bool(jnp.issubdtype(dtype, jnp.floating))


@functools.lru_cache(maxsize=16)
def variable_shapes(arch: str, num_classes: int) -> dict:
    """{"collection/.../name": ShapeDtypeStruct} of `arch`'s variables, in the model's order
    (cached: 85 ms to build, and every model loaded is checked against them)."""
    tree = jax.eval_shape(lambda: create(arch, num_classes).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return traverse_util.flatten_dict(dict(tree), sep="/")


def check_variables(path, variables, arch: str) -> None:
    """Refuses variables that are not `arch`'s (another tree, other shapes than the model's at
    their class count, integers where it has floats or the reverse) or that hold NaN or infinite
    values, naming `path` and what is wrong."""
    try:
        classes = num_classes_of(variables["params"])
    except (KeyError, TypeError, IndexError):
        raise CheckpointError(f"{path}: holds no classifier (params/fc/kernel); not a {arch} "
                              "model") from None
    want = variable_shapes(arch, classes)
    try:
        got = traverse_util.flatten_dict({k: dict(variables.get(k) or {})
                                          for k in ("params", "batch_stats")}, sep="/")
    except (TypeError, ValueError):  # a collection that is not a dict: all of it is missing
        got = {}
    wrong = sorted(k for k in want.keys() | got.keys()
                   if k not in want or k not in got or np.shape(got[k]) != want[k].shape
                   or _floating(got[k]) != _floating(want[k]))
    if wrong:
        raise CheckpointError(f"{path}: not a {arch} model of {classes} classes (wrong or missing "
                              f"{', '.join(wrong[:4])}{', ...' if len(wrong) > 4 else ''}); "
                              "rewrite or reconvert it")
    bad = [k for k, v in got.items() if _floating(v) and not np.all(np.isfinite(v))]
    if bad:
        raise CheckpointError(f"{path}: non-finite values (NaN or Inf) in {', '.join(bad[:4])}; "
                              "this model diverged or the file is damaged: use an earlier "
                              "checkpoint")
