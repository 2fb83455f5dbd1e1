"""Reading and writing the original PyTorch checkpoints.

`load_torch_checkpoint(path, arch=None)` -> Flax variables {"params", "batch_stats"} (numpy
arrays: float32 parameters and statistics, int32 `num_batches_tracked`), from
- a full training checkpoint of main.py: {'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'},
- the merge script's / released model's {'state_dict': ...},
- a bare state_dict (e.g. torchvision's resnet50-0676ba61.pth),
with or without the `module.` prefix of nn.DataParallel. Files are read with
`torch.load(weights_only=True, map_location="cpu")`: a file that would run code when unpickled is
refused, never executed; CUDA tensors load on a machine without a GPU.

`save_torch_checkpoint(variables, arch, path)` writes {'state_dict': ...} with `module.` keys in the
original's registration order and `num_batches_tracked` as int64 scalars: main.py / evaluate.py /
merge_from_bwx2_to_ternary.py load it unchanged. Load -> save reproduces every tensor bit for bit.

Problems with a file raise `sttn_jax.checkpoints.CheckpointError` with one message naming the file
and what is wrong. torch is imported inside the functions only.
"""
from __future__ import annotations

import collections
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from sttn_jax.checkpoints import CheckpointError
from sttn_jax.interop import names
from sttn_jax.interop.names import BATCH_STATS, CONV, COUNT, DENSE, PARAMS

DATA_PARALLEL_PREFIX = "module."
# The first bytes of a legacy (pre-zip) torch.save file: the pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_MAX_LISTED = 8
_INT32_MAX = np.iinfo(np.int32).max


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("PyTorch interop needs torch: pip install 'sttn-jax[torch]' "
                          f"(import failed: {e})") from None
    return torch


def _listing(items, limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------
# Reading


def _key_mismatch(missing, unexpected, noun: str = "") -> str:
    """'missing<noun>: a, b; unexpected<noun>: c' for the parts that are non-empty."""
    parts = [f"{what}{noun}: {_listing(keys)}"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    return "; ".join(parts)


def read_torch_file(path):
    """`torch.load(path, weights_only=True, map_location="cpu")`, with one clear CheckpointError
    for a missing file, a file that is not a torch.save file, and a file whose unpickling would run
    code (refused)."""
    torch = _import_torch()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file (a PyTorch checkpoint is one .pth/.pth.tar file)")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not zipfile.is_zipfile(path) and head != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive "
                              "nor a legacy torch.save file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one message
        text = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: unpickling this file would run code ({unsafe.group(1)} is not a "
                "tensor or plain value), and it is loaded with torch.load(weights_only=True), which "
                "never executes untrusted code; a checkpoint should hold only tensors, numbers and "
                "strings. If you trust its source, re-save its tensors with torch.save(state_dict)"
            ) from None
        if "Weights only load failed" in text or "weights_only" in text:
            detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0:1]
            detail = detail[0] if detail else "unreadable"
            raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), which does not "
                                  f"execute untrusted code: {detail}") from None
        last = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{last})") from None


def _is_tensor_dict(obj, torch) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj, path="<checkpoint>"):
    """The state_dict inside a loaded checkpoint object (full training checkpoint, {'state_dict'}
    or a bare state_dict), with a `module.` prefix removed. Returns (state_dict, info) where info
    holds 'prefixed' (bool), 'arch' (the checkpoint's 'arch' entry or None) and 'kind'."""
    torch = _import_torch()
    info = {"prefixed": False, "arch": None, "kind": "state_dict"}
    if isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
        info["kind"] = "training checkpoint" if "optimizer" in obj or "epoch" in obj else "{'state_dict'}"
        info["arch"] = obj.get("arch") if isinstance(obj.get("arch"), str) else None
        if not _is_tensor_dict(sd, torch):
            raise CheckpointError(f"{path}: not a checkpoint: its 'state_dict' entry is a "
                                  f"{type(sd).__name__} that is not a dict of named tensors")
    elif _is_tensor_dict(obj, torch):
        sd = obj
    elif isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a model checkpoint: a dict with keys "
                              f"[{_listing(map(repr, obj.keys()))}], no 'state_dict' and not all "
                              "values tensors")
    else:
        raise CheckpointError(f"{path}: not a model checkpoint: it holds a {type(obj).__name__}, "
                              "not a state_dict or {'state_dict': ...}")
    prefixed = [k.startswith(DATA_PARALLEL_PREFIX) for k in sd]
    if all(prefixed):
        sd = collections.OrderedDict((k[len(DATA_PARALLEL_PREFIX):], v) for k, v in sd.items())
        info["prefixed"] = True
    elif any(prefixed):
        raise CheckpointError(f"{path}: mixes keys with and without the nn.DataParallel prefix "
                              f"'module.' (e.g. {next(k for k in sd if k.startswith('module.'))!r} "
                              f"and {next(k for k in sd if not k.startswith('module.'))!r})")
    return sd, info


def read_state_dict(path):
    """(state_dict without the `module.` prefix, info) of a torch checkpoint file."""
    return extract_state_dict(read_torch_file(path), path)


def _num_classes_of(sd, arch: str) -> int:
    fc = sd.get("fc.weight")
    if fc is not None and fc.ndim == 2 and fc.shape[0] > 0:
        return int(fc.shape[0])
    return 1000


def _to_numpy(tensor, entry, path):
    torch = _import_torch()
    t = tensor.detach().cpu()
    if entry.kind == COUNT:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise CheckpointError(f"{path}: {entry.torch_key} should be an integer count, "
                                  f"found {t.dtype}")
        value = int(t.reshape(()).item())
        if not 0 <= value <= _INT32_MAX:
            raise CheckpointError(f"{path}: {entry.torch_key} = {value} is out of range")
        return np.asarray(value, dtype=np.int32)
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: {entry.torch_key} should be floating point, found {t.dtype}")
    if t.dtype != torch.float32:
        t = t.to(torch.float32)  # float16/bfloat16 widen exactly; float64 rounds
    a = t.numpy()
    if entry.kind == CONV:
        a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif entry.kind == DENSE:
        a = a.T  # (out, in) -> (in, out)
    return np.array(a, dtype=np.float32, order="C", copy=True)


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def state_dict_to_variables(state_dict, arch: str | None = None, path="<state_dict>",
                            num_classes: int | None = None):
    """Flax variables {"params", "batch_stats"} from a torch state_dict (keys without `module.`).

    arch None: inferred from the keys. num_classes None: from fc.weight. A missing
    `num_batches_tracked` counts as 0 (as torch's BatchNorm does for old state_dicts)."""
    return _convert(state_dict, arch, path, num_classes)[0]


def _convert(state_dict, arch, path, num_classes):
    keys = list(state_dict.keys())
    found = names.infer_arch(keys)
    if arch is None:
        if found is None:
            raise CheckpointError(
                f"{path}: cannot tell the architecture from its keys (e.g. "
                f"{_listing(keys[:4], 4)}); expected a {' / '.join(names.ARCHS)} state_dict, "
                "or pass arch")
        arch = found
    elif arch not in names.ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}; choose one of {names.ARCHS}")
    elif found is not None and found != arch:
        raise CheckpointError(f"{path}: holds a {names.describe_arch(found)} model, not {arch}; "
                              f"load it with arch={found!r} (--arch {found})")
    if num_classes is None:
        num_classes = _num_classes_of(state_dict, arch)
    expected = names.by_torch_key(arch, num_classes)
    missing = [k for k in expected if k not in state_dict
               and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match {arch}: "
                              + _key_mismatch(missing, unexpected, " keys"))
    wrong = []
    for key, entry in expected.items():
        if key in state_dict:
            shape = tuple(state_dict[key].shape)
            ok = shape == entry.torch_shape or (entry.kind == COUNT and int(np.prod(shape)) == 1)
            if not ok:
                wrong.append(f"{key} {shape} (expected {entry.torch_shape})")
    if wrong:
        raise CheckpointError(f"{path}: wrong shapes for {arch}: {_listing(wrong)}")
    variables = {PARAMS: {}, BATCH_STATS: {}}
    for key, entry in expected.items():
        if key in state_dict:
            value = _to_numpy(state_dict[key], entry, path)
        else:
            value = np.asarray(0, dtype=np.int32)
        _set(variables[entry.collection], entry.path, value)
    return variables, arch


def load_torch_checkpoint(path, arch: str | None = None, num_classes: int | None = None):
    """Flax variables {"params", "batch_stats"} of `arch` from an original PyTorch checkpoint.

    arch: "resnet18_bwx2", "resnet18_ter", "resnet50", or None to infer it from the keys.
    num_classes: None reads it from fc.weight. Raises CheckpointError (naming the file) for
    anything that is not such a checkpoint."""
    return load_torch_checkpoint_with_arch(path, arch, num_classes)[0]


def load_torch_checkpoint_with_arch(path, arch: str | None = None, num_classes: int | None = None):
    """(variables, arch): `load_torch_checkpoint` that also says which arch it found."""
    sd, _ = read_state_dict(path)
    return _convert(sd, arch, path, num_classes)


# --------------------------------------------------------------------------------------------
# Writing


def _flatten(tree, prefix=()):
    for name, value in tree.items():
        if isinstance(value, dict) or hasattr(value, "items"):
            yield from _flatten(value, prefix + (str(name),))
        else:
            yield prefix + (str(name),), value


def _torch_order(arch: str, num_classes: int) -> list[str]:
    """The original's state_dict key order (registration order), from the reference model."""
    from sttn_jax.interop import reference

    try:
        return list(reference.build(arch, num_classes, device="meta").state_dict().keys())
    except Exception:  # noqa: BLE001 - the order is cosmetic; fall back to the Flax order
        return names.torch_keys(arch, num_classes)


def _infer_num_classes(params) -> int:
    fc = params.get("fc", {}) if hasattr(params, "get") else {}
    kernel = fc.get("kernel") if hasattr(fc, "get") else None
    return int(np.shape(kernel)[-1]) if kernel is not None and np.ndim(kernel) == 2 else 1000


def variables_to_state_dict(variables, arch: str, prefix: str = DATA_PARALLEL_PREFIX,
                            params_only: bool | None = None, where: str = "variables"):
    """An OrderedDict of torch tensors in the original's layout and key order.

    variables: {"params": ..., "batch_stats": ...}. "params" may be a gradient tree of the same
    structure. Without "batch_stats" (absent or empty) only the parameter keys are written, or
    pass params_only=True to ignore the statistics. Float arrays keep their dtype (float32 stays
    bit-exact; float64 gradients stay float64); num_batches_tracked becomes an int64 scalar."""
    torch = _import_torch()
    if arch not in names.ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}; choose one of {names.ARCHS}")
    if not hasattr(variables, "get") or PARAMS not in variables:
        raise CheckpointError(f"{where}: expected a dict {{'params': ..., 'batch_stats': ...}}, "
                              f"got {type(variables).__name__}")
    stats = variables.get(BATCH_STATS) or {}
    if params_only is None:
        params_only = len(stats) == 0
    num_classes = _infer_num_classes(variables[PARAMS])
    expected = [e for e in names.entries(arch, num_classes)
                if not (params_only and e.collection == BATCH_STATS)]
    given = {}
    for collection in ((PARAMS,) if params_only else (PARAMS, BATCH_STATS)):
        for p, leaf in _flatten(variables.get(collection) or {}):
            given[(collection,) + p] = leaf
    want = {(e.collection,) + e.path: e for e in expected}
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
        if e.kind == CONV:
            a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif e.kind == DENSE:
            a = a.T
        tensors[e.torch_key] = torch.from_numpy(np.array(a, order="C", copy=True))
    order = [k for k in _torch_order(arch, num_classes) if k in tensors]
    order += [k for k in tensors if k not in set(order)]
    return collections.OrderedDict((prefix + k, tensors[k]) for k in order)


def gradients_to_torch_state_dict(grads, arch: str, prefix: str = ""):
    """A gradient tree (the "params" structure, or {"params": grads}) as {torch name: tensor},
    named like `model.named_parameters()` of the unwrapped reference model (no prefix)."""
    if hasattr(grads, "get") and PARAMS in grads:
        grads = grads[PARAMS]
    return variables_to_state_dict({PARAMS: grads}, arch, prefix=prefix, params_only=True,
                                   where="gradients")


def save_torch_checkpoint(variables, arch: str, path, extra: dict | None = None,
                          prefix: str = DATA_PARALLEL_PREFIX):
    """Writes `variables` of `arch` as `torch.save({'state_dict': ...}, path)` with nn.DataParallel
    keys, which the original code loads unchanged. `extra` entries (e.g. {'epoch': 3}) are added
    to the saved dict. Returns the path."""
    torch = _import_torch()
    path = Path(path)
    sd = variables_to_state_dict(variables, arch, prefix=prefix, where=f"cannot write {path}")
    obj = {"state_dict": sd}
    obj.update(extra or {})
    if path.parent and not path.parent.exists():
        os.makedirs(path.parent, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
