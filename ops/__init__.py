"""STTN's custom operators, usable from any JAX code. (`ops` is a generic top-level name, also
an unrelated PyPI package: install sttn-jax into its own environment.)"""
from ops.binary_pair import (LATENT_KERNEL_NAMES, binary_pairs, clamp_latent_kernels,
                             fold_binary_pair, folded_zeros, latent_kernel_paths, pair_alpha)
from ops.pooling import max_pool
from ops.ternary import ternary_activation

__all__ = ["ternary_activation", "max_pool", "fold_binary_pair", "folded_zeros",
           "clamp_latent_kernels", "pair_alpha", "latent_kernel_paths", "binary_pairs",
           "LATENT_KERNEL_NAMES"]
