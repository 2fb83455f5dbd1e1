"""bwx2 -> ternary: each binary pair becomes one ternary convolution (the original
`merge_from_bwx2_to_ternary.py`): weight = B1 + B2 = alpha (sign W1 + sign W2), bias = b1 + b2;
every other tensor (stem, BatchNorm, PReLU, fc) is copied.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ops import fold_binary_pair


def _is_pair(node) -> bool:
    return isinstance(node, dict) and {"kernel_1", "kernel_2", "bias_1", "bias_2"} <= set(node)


def merge_params(params):
    """Ternary-model params from bwx2 params. The latent kernels are clamped to [-1, 1] first, as
    the original does before every binarization (a no-op for its saved checkpoints)."""
    if _is_pair(params):
        w1 = jnp.clip(jnp.asarray(params["kernel_1"]), -1, 1)
        w2 = jnp.clip(jnp.asarray(params["kernel_2"]), -1, 1)
        kernel = fold_binary_pair(w1, w2)
        bias = jnp.asarray(params["bias_1"]) + jnp.asarray(params["bias_2"])
        return {"kernel": np.asarray(kernel), "bias": np.asarray(bias)}
    if isinstance(params, dict):
        return {k: merge_params(v) for k, v in params.items()}
    return params


def merge_variables(variables):
    """{"params", "batch_stats"} of a resnet18_ter model from those of a resnet18_bwx2 model."""
    if not any(True for _ in _pairs(variables["params"])):
        raise ValueError("these variables hold no binary pairs (kernel_1/kernel_2): not a resnet18_bwx2 model")
    return {"params": merge_params(variables["params"]), "batch_stats": variables.get("batch_stats", {})}


def _pairs(tree, prefix=""):
    if _is_pair(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _pairs(v, f"{prefix}/{k}" if prefix else k)
