"""Integer form of a merged ternary model, for int8 inference and the packed file.

A merged convolution's kernel is T = alpha (sign W1 + sign W2): per output channel (last axis)
every weight is one of -2a, -a, 0, +a, +2a (+-a only where a latent weight was exactly 0), so
T = codes * scale exactly, with integer codes in {-2, ..., 2} and a float32 scale per channel.
`ternary_codes` finds that split (refusing kernels without it); `int8_variables` applies it to
resnet18_ter's 16 block convolutions (host numpy, once) for its int8 model.
"""
from __future__ import annotations

import numpy as np
from flax import traverse_util

from sttn_jax.archs import FIRST_BLOCK_INDEX, RESNET18_BLOCKS

MAX_CODE = 2
CODES, SCALE = "codes", "scale"  # parameter names of `layers.Int8TernaryConv`
MERGE_FIX = ("merge a resnet18_bwx2 model first (merge.py, or sttn_jax.merging.merge_variables): "
             "only merged ternary kernels alpha * (sign W1 + sign W2) have integer codes")


def ternary_conv_paths() -> list[str]:
    """The '/'-joined module paths of resnet18_ter's 16 ternary convolutions, in network order."""
    return [f"features_{FIRST_BLOCK_INDEX + i}/{conv}"
            for i in range(len(RESNET18_BLOCKS)) for conv in ("conv1", "conv2")]


def ternary_codes(kernel, name: str = "kernel") -> tuple[np.ndarray, np.ndarray]:
    """(codes int8, scale float32 per output channel) with codes * scale == kernel exactly.

    scale = max|kernel| / 2 per channel (= alpha when the channel has a +-2a weight), so codes are
    in {-2, -1, 0, 1, 2}; an all-zero channel gets scale 0 and codes 0. `name` labels the error.
    Raises ValueError when the kernel is not of that form (e.g. a float model never merged).
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 1 or not np.issubdtype(kernel.dtype, np.floating):
        raise ValueError(f"{name}: expected a floating point kernel with the output channel last, "
                         f"got dtype {kernel.dtype} and shape {kernel.shape}")
    if not np.all(np.isfinite(kernel)):
        raise ValueError(f"{name}: the kernel holds NaN or infinite values; {MERGE_FIX}")
    flat = kernel.reshape(-1, kernel.shape[-1])
    native = np.abs(flat).max(axis=0, initial=0) / 2
    codes = np.rint(flat / np.where(native > 0, native, 1))
    exact = (np.abs(codes) <= MAX_CODE) & (codes * native == flat)
    if not np.all(exact):
        bad = np.argwhere(~exact)[0]
        raise ValueError(
            f"{name} is not a ternary kernel: output channel {bad[1]} holds "
            f"{float(flat[tuple(bad)])!r}, not a multiple in {{-2, -1, 0, 1, 2}} of alpha = "
            f"{float(native[bad[1]])!r}; {MERGE_FIX}")
    scale = native.astype(np.float32)
    if np.any(scale.astype(kernel.dtype) != native):
        odd = float(native[scale != native][0])
        raise ValueError(f"{name}: alpha {odd!r} is not a float32 value (a {kernel.dtype} model?); "
                         "cast the merged variables to float32 first")
    return codes.astype(np.int8).reshape(kernel.shape), scale


def kernel_from_codes(codes, scale, dtype=np.float32) -> np.ndarray:
    """The kernel back from `ternary_codes`'s output (exact, in the kernel's original `dtype`)."""
    return np.asarray(codes).astype(dtype) * np.asarray(scale).astype(dtype)


def int8_variables(variables):
    """resnet18_ter variables for the int8 model: each of the 16 ternary kernels replaced by its
    `codes` (int8, HWIO) and `scale` (float32 per output channel), all else unchanged."""
    flat = traverse_util.flatten_dict(dict(variables["params"]), sep="/")
    for path in ternary_conv_paths():
        if f"{path}/{CODES}" in flat:
            raise ValueError(f"{path} is already in int8 form (codes, scale): pass these variables "
                             "to the int8 model as they are")
        if f"{path}/kernel" not in flat:
            raise ValueError(f"{path} has no merged kernel: not a resnet18_ter model; {MERGE_FIX}")
        codes, scale = ternary_codes(flat.pop(f"{path}/kernel"), name=f"{path}/kernel")
        flat[f"{path}/{CODES}"], flat[f"{path}/{SCALE}"] = codes, scale
    return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}
