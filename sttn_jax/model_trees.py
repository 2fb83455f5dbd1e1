"""A model's variables as a tree: which arch and class count a tree is, the shapes each arch's
tree has, and the check every model read from a file passes (`model_io.load`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sttn_jax import models
from sttn_jax.archs import BWX2, TEACHER, TERNARY
from sttn_jax.errors import CheckpointError


def arch_of(params) -> str | None:
    """The arch a parameter tree belongs to, from its structure (None if none)."""
    keys = traverse_util.flatten_dict(dict(params), sep="/") if hasattr(params, "keys") else {}
    return (BWX2 if "features_4/conv1/kernel_1" in keys else
            TERNARY if "features_4/conv1/kernel" in keys else
            TEACHER if "layer1_0/conv1/kernel" in keys else None)


def num_classes_of(params) -> int:
    return int(np.shape(params["fc"]["kernel"])[-1])


def _floating(leaf) -> bool:  # an array or an abstract one; bfloat16 included
    return bool(jnp.issubdtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype,
                               jnp.floating))


@functools.lru_cache(maxsize=16)
def variable_shapes(arch: str, num_classes: int) -> dict:
    """{"collection/.../name": ShapeDtypeStruct} of `arch`'s variables, in the model's order."""
    tree = jax.eval_shape(lambda: models.init_variables(models.create(arch, num_classes),
                                                        jax.random.PRNGKey(0)))
    return traverse_util.flatten_dict(dict(tree), sep="/")


def check_variables(path, variables, arch: str) -> None:
    """Refuses variables that are not `arch`'s (tree, shapes at their class count, float or not)
    or that hold NaN or infinite values, naming `path` and what is wrong."""
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
