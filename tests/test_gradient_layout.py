"""sttn_jax.gradient_layout: where a GPU step keeps its gradients changes no value."""
import jax
import jax.numpy as jnp
import numpy as np

from sttn_jax import gradient_layout


def test_gathered_by_length_keeps_every_value_and_reads_each_length_from_one_array():
    rng = np.random.default_rng(0)
    leaf = lambda shape, dtype=jnp.float32: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    tree = {"bn": {"scale": leaf(64), "bias": leaf(64)}, "prelu": leaf(64), "fc": leaf(128),
            "kernel": leaf((3, 3, 4, 64)), "half": [leaf(64, jnp.bfloat16), leaf(64, jnp.bfloat16)]}
    fn = jax.jit(gradient_layout.gathered_by_length)
    out = fn(tree)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # one stacked array per (length, dtype) with two or more members: float32[64] and bfloat16[64]
    text = fn.lower(tree).as_text()
    assert text.count("stablehlo.concatenate") == 2
    assert text.count("stablehlo.optimization_barrier") == 2


def test_arranged_for_gpu_update_keeps_every_value():
    rng = np.random.default_rng(1)
    tree = {"k": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
            "a": jnp.asarray(rng.normal(size=4), jnp.float32),
            "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
    out = jax.jit(gradient_layout.arranged_for_gpu_update)(tree)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
