"""Where a GPU training step keeps its gradients for the optimizer, by XLA's H100 plan: each
convolution kernel's gradient in the parameters' layout, and the per-channel gradients of equal
length in one array. XLA's GPU compiler fuses elementwise updates that read a common array into
one kernel, and does not fuse independent ones: so Adam updates the state in place, not through
transposed copies, and each group of per-channel parameters in one kernel, not one per array.
The gradients' values are untouched, bit for bit: only where they are stored changes."""
import collections

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint


def in_parameter_layout(grad):
    """A kernel's gradient in the parameters' layout (cuDNN writes it output-channel major)."""
    return grad if grad.ndim != 4 else jax.lax.optimization_barrier(
        with_layout_constraint(grad, Layout(tuple(range(4)))))


def gathered_by_length(tree):
    """`tree` with its 1-D leaves of each (length, dtype) read from one stacked array, which an
    optimisation barrier keeps (XLA would fold the slices of a stack back into its operands)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    groups = collections.defaultdict(list)
    for i, leaf in enumerate(leaves):
        if leaf.ndim == 1:
            groups[(leaf.shape, leaf.dtype)].append(i)
    for members in groups.values():
        if len(members) > 1:
            stacked = jax.lax.optimization_barrier(jnp.stack([leaves[i] for i in members]))
            for row, i in enumerate(members):
                leaves[i] = stacked[row]
    return treedef.unflatten(leaves)


def arranged_for_gpu_update(grads):
    """Both arrangements, for the optimizer of a step on GPUs."""
    return gathered_by_length(jax.tree_util.tree_map(in_parameter_layout, grads))
