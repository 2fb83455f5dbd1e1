"""Writing the original's checkpoint format, which the original code loads unchanged and
`torch_io` reads back bit for bit. torch is imported on first use."""

import collections
import functools
from pathlib import Path

import numpy as np
from flax import traverse_util

from sttn_jax import archs, json_io, model_trees
from sttn_jax.errors import CheckpointError
from sttn_jax.interop import names, reference
from sttn_jax.interop.names import BATCH_STATS, COUNT, PARAMS, TORCH_AXES
from sttn_jax.interop.torch_io import DATA_PARALLEL_PREFIX, _import_torch, _key_mismatch, _listing


@functools.lru_cache(maxsize=None)
def _torch_order(arch: str, num_classes: int) -> list[str]:
    """The original's state_dict key order, from the reference model built on the CPU ("meta"
    would import torch._dynamo and Triton's LLVM into a JAX process)."""
    return list(reference.build(arch, num_classes).state_dict().keys())


def variables_to_state_dict(variables, arch: str, prefix: str = DATA_PARALLEL_PREFIX,
                            params_only: bool | None = None, where: str = "variables"):
    """An OrderedDict of torch tensors in the original's layout and key order from {"params",
    "batch_stats"} (or params only); floats keep their dtype, num_batches_tracked is int64."""
    torch = _import_torch()
    archs.check_arch(arch)
    if not hasattr(variables, "get") or PARAMS not in variables:
        raise CheckpointError(f"{where}: expected a dict {{'params': ..., 'batch_stats': ...}}, "
                              f"got {type(variables).__name__}")
    if params_only is None:
        params_only = not variables.get(BATCH_STATS)
    try:
        num_classes = model_trees.num_classes_of(variables[PARAMS])
    except (KeyError, TypeError, IndexError):
        num_classes = 1000  # no classifier: the key check below names what is missing
    flat = traverse_util.flatten_dict({c: dict(variables.get(c) or {}) for c in
                                       ((PARAMS,) if params_only else (PARAMS, BATCH_STATS))})
    given = {tuple(map(str, p)): leaf for p, leaf in flat.items()}
    want = {(e.collection,) + e.path: e for e in names.entries(arch, num_classes)
            if not (params_only and e.collection == BATCH_STATS)}
    missing = ["/".join(k) for k in want if k not in given]
    unexpected = ["/".join(k) for k in given if k not in want]
    if missing or unexpected:
        raise CheckpointError(f"{where}: not {arch} variables; "
                              + _key_mismatch(missing, unexpected))
    wrong = [f"{'/'.join(k)} {tuple(np.shape(given[k]))} (expected {e.flax_shape})"
             for k, e in want.items() if tuple(np.shape(given[k])) != e.flax_shape]
    if wrong:
        raise CheckpointError(f"{where}: wrong shapes for {arch}: {_listing(wrong)}")
    tensors = {}
    for k, e in want.items():
        a = np.asarray(given[k])
        if e.kind == COUNT:
            tensors[e.torch_key] = torch.tensor(int(a), dtype=torch.int64)
            continue
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32)  # bfloat16/float16 widen exactly
        if e.kind in TORCH_AXES:  # HWIO -> OIHW, (in, out) -> (out, in)
            a = a.transpose(TORCH_AXES[e.kind])
        tensors[e.torch_key] = torch.from_numpy(np.array(a, order="C", copy=True))
    order = [k for k in _torch_order(arch, num_classes) if k in tensors]
    order += [k for k in tensors if k not in set(order)]
    return collections.OrderedDict((prefix + k, tensors[k]) for k in order)


def gradients_to_torch_state_dict(grads, arch: str, prefix: str = ""):
    """A gradient tree (of "params", or {"params": grads}) as {torch parameter name: tensor}."""
    if hasattr(grads, "get") and PARAMS in grads:
        grads = grads[PARAMS]
    return variables_to_state_dict({PARAMS: grads}, arch, prefix=prefix, params_only=True,
                                   where="gradients")


def save_torch_checkpoint(variables, arch: str, path, extra: dict | None = None,
                          prefix: str = DATA_PARALLEL_PREFIX):
    """Writes `torch.save({'state_dict': ..., **extra}, path)` with nn.DataParallel keys, whole."""
    torch = _import_torch()
    path = Path(path)
    sd = variables_to_state_dict(variables, arch, prefix=prefix, where=f"cannot write {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with json_io.written_aside(path) as staged:
        torch.save({"state_dict": sd, **(extra or {})}, staged)
    return path
