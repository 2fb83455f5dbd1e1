"""`fold_binary_pair`: STTN's two latent binary kernels -> one ternary kernel, with the original
gradient rule as its VJP.

The original binarizes each kernel to `alpha * sign(W)` (alpha per output channel, shared by the
pair) and adds two convolutions; by linearity one convolution with T = alpha * (sign W1 + sign W2)
is the same, and dL/dB1 = dL/dB2 = dL/dT = G. The latent kernels get the original's gradient
G (zeroed where |W| > 1.96) + sign(W) * mean(sign(W) * G). Kernels have the output channel last.
"""

import math

import jax
import jax.numpy as jnp

# Names of the latent binary kernels in the models' parameter trees (`sttn_jax.layers`).
LATENT_KERNEL_NAMES = ("kernel_1", "kernel_2")
# The original zeroes the gradient of latent weights beyond this (never, after the usual clamp).
GRADIENT_CUTOFF = 1.96


def pair_alpha(w1, w2):
    """alpha = (sum|w1| + sum|w2|) / (2n) per output channel (last axis), n = fan-in."""
    if w1.shape != w2.shape:
        raise ValueError(f"a binary pair needs two kernels of one shape, got {w1.shape} and {w2.shape}")
    n = math.prod(w1.shape[:-1])
    # both kernels' sums as one reduction over them stacked
    sums = jnp.sum(jnp.abs(jnp.stack([w1, w2])), axis=tuple(range(1, w1.ndim)))
    return (sums[0] + sums[1]) / (2 * n)


def folded_zeros(w1, w2):
    """Where `fold_binary_pair(w1, w2)` is 0, without folding: sign(w1) = -sign(w2)."""
    return jnp.sign(w1) + jnp.sign(w2) == 0


def _fold(w1, w2):
    return pair_alpha(w1, w2) * (jnp.sign(w1) + jnp.sign(w2))


@jax.custom_vjp
def fold_binary_pair(w1, w2):
    """alpha * (sign(w1) + sign(w2)): values in {-2 alpha, 0, +2 alpha} per output channel."""
    return _fold(w1, w2)


def _fold_fwd(w1, w2):
    return _fold(w1, w2), (w1, w2)


def latent_gradients(kernels, g):
    """The original `updateBinaryGradWeight` for latent kernels given the gradient G of their
    binarized sum: G (zeroed where |W| > 1.96) + sign(W) * mean(sign(W) * G) per output channel,
    the means of all kernels as one reduction."""
    signs = [jnp.sign(w).astype(g.dtype) for w in kernels]
    means = jnp.mean(jnp.stack([s * g for s in signs]), axis=tuple(range(1, g.ndim)))
    return tuple((jnp.where(jnp.abs(w) > GRADIENT_CUTOFF, jnp.zeros((), g.dtype), g)
                  + s * mean).astype(w.dtype) for w, s, mean in zip(kernels, signs, means))


fold_binary_pair.defvjp(_fold_fwd, latent_gradients)


def _is_latent_kernel(path) -> bool:
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return name in LATENT_KERNEL_NAMES


def clamp_latent_kernels(params):
    """Clamps only the latent binary kernels to [-1, 1], as the original does before every step."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.clip(leaf, -1, 1) if _is_latent_kernel(path) else leaf, params)


def binary_pairs(params, _path=()):
    """Yields ('features_4/conv1', {"kernel_1", "kernel_2", "bias_1", "bias_2"}) for every pair."""
    if not hasattr(params, "items"):
        return
    if all(name in params for name in LATENT_KERNEL_NAMES):
        yield "/".join(_path), params
        return
    for key, value in params.items():
        yield from binary_pairs(value, _path + (str(key),))


def latent_kernel_paths(params):
    """The '/'-joined paths of the latent binary kernels in `params` (for reports and tests)."""
    return [f"{path}/{name}" for path, _ in binary_pairs(params) for name in LATENT_KERNEL_NAMES]
