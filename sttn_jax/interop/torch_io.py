"""Reading the original PyTorch checkpoints (a training checkpoint, {'state_dict'} or a bare
state_dict, `module.` prefix or not) into Flax variables, with `torch.load(weights_only=True)`:
a file whose unpickling would run code is refused. torch is imported on first use."""

import collections
import re
import zipfile
from pathlib import Path

import numpy as np
from flax import traverse_util

from sttn_jax import archs
from sttn_jax.errors import ArchMismatchError, CheckpointError
from sttn_jax.interop import names
from sttn_jax.interop.names import BATCH_STATS, COUNT, PARAMS, TORCH_AXES

DATA_PARALLEL_PREFIX = "module."
# The first bytes of a legacy (pre-zip) torch.save file: the pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_TORCH_SAVE_FIX = "give a .pth/.pth.tar written by torch.save"
_COPY_AGAIN = "copy or download it again"
_STATE_DICT_FIX = "give a file holding a state_dict or {'state_dict': state_dict}"


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("PyTorch interop needs torch: pip install 'sttn-jax[torch]' "
                          f"(import failed: {e})") from None
    return torch


def _listing(items, limit: int = 8) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (
        f", ... ({len(items)} in all)" if len(items) > limit else "")


def _key_mismatch(missing, unexpected, noun: str = "") -> str:
    """'missing<noun>: a, b; unexpected<noun>: c' for the parts that are non-empty."""
    return "; ".join(f"{what}{noun}: {_listing(keys)}"
                     for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)


def read_torch_file(path):
    """`torch.load(path, weights_only=True)` on the CPU, every failure one CheckpointError."""
    torch = _import_torch()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file (a PyTorch checkpoint is one .pth/.pth.tar file)")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head != _LEGACY_MAGIC:
        _check_zip(path, head)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one message
        text = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe or "weights_only" in text:
            detail = (f"{unsafe.group(1)} is not a tensor or plain value" if unsafe else
                      (text.split("WeightsUnpickler error:")[-1].strip().splitlines() or ["?"])[0])
            raise CheckpointError(
                f"{path}: refused: unpickling it would run code ({detail[:200]}), and "
                "torch.load(weights_only=True) never executes untrusted code; if you trust its "
                "source, re-save its tensors with torch.save(state_dict)") from None
        last = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{last[:200]}); {_TORCH_SAVE_FIX}") from None


def _check_zip(path: Path, head: bytes) -> None:
    """Refuses a file that is not an intact zip archive before torch.load, which checks no CRC."""
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK\x03\x04"):  # a zip archive's first bytes
            raise CheckpointError(f"{path}: truncated or damaged (a zip archive without its "
                                  f"directory at the end); {_COPY_AGAIN}")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive "
                              f"nor a legacy torch.save file); {_TORCH_SAVE_FIX}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            pickled = any(name.endswith("data.pkl") for name in archive.namelist())
        detail = bad and f"member {bad} fails its CRC check"
    except Exception as e:  # noqa: BLE001 - any defect of the archive is one message
        detail = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if detail:
        raise CheckpointError(f"{path}: damaged ({detail}); {_COPY_AGAIN}")
    if not pickled:
        raise CheckpointError(f"{path}: a zip archive, but not one torch.save wrote (no data.pkl "
                              f"in it); {_TORCH_SAVE_FIX}")


def _is_tensor_dict(obj, torch) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj, path="<checkpoint>"):
    """(state_dict without a `module.` prefix, info {'prefixed', 'arch', 'kind'}) of a loaded
    checkpoint object."""
    torch = _import_torch()
    info = {"prefixed": False, "arch": None, "kind": "state_dict"}
    if isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
        info["kind"] = "training checkpoint" if "optimizer" in obj or "epoch" in obj else "{'state_dict'}"
        info["arch"] = obj.get("arch") if isinstance(obj.get("arch"), str) else None
        if not _is_tensor_dict(sd, torch):
            raise CheckpointError(f"{path}: not a checkpoint: its 'state_dict' entry is a "
                                  f"{type(sd).__name__} that is not a dict of named tensors; "
                                  f"{_STATE_DICT_FIX}")
    elif _is_tensor_dict(obj, torch):
        sd = obj
    elif isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a model checkpoint: a dict with keys "
                              f"[{_listing(map(repr, obj.keys()))}], no 'state_dict' and not all "
                              f"values tensors; {_STATE_DICT_FIX}")
    else:
        raise CheckpointError(f"{path}: not a model checkpoint: it holds a {type(obj).__name__}, "
                              f"not a state_dict; {_STATE_DICT_FIX}")
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


def _to_numpy(tensor, entry, path):
    torch = _import_torch()
    t = tensor.detach().cpu()
    if entry.kind == COUNT:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise CheckpointError(f"{path}: {entry.torch_key} should be an integer count, "
                                  f"found {t.dtype}")
        value = int(t.reshape(()).item())
        if not 0 <= value <= np.iinfo(np.int32).max:
            raise CheckpointError(f"{path}: {entry.torch_key} = {value} is out of range")
        return np.asarray(value, dtype=np.int32)
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: {entry.torch_key} should be floating point, found {t.dtype}")
    a = t.float().numpy()  # float16/bfloat16 widen exactly; float64 rounds
    if entry.kind in TORCH_AXES:  # OIHW -> HWIO, (out, in) -> (in, out)
        a = a.transpose(np.argsort(TORCH_AXES[entry.kind]))
    return np.array(a, dtype=np.float32, order="C", copy=True)


def state_dict_to_variables(state_dict, arch: str | None = None, path="<state_dict>",
                            num_classes: int | None = None):
    """Flax variables of a torch state_dict without `module.` (num_batches_tracked 0 if absent)."""
    return _convert(state_dict, arch, path, num_classes)[0]


def _convert(state_dict, arch, path, num_classes):
    keys = list(state_dict.keys())
    found = names.infer_arch(keys)
    other = None if found else names.torchvision_resnet(keys)
    if arch is not None:
        archs.check_arch(arch)
        if (found or other) not in (None, arch):
            raise ArchMismatchError(path, found or other, arch, known=found is not None)
    elif found is None:
        what = f"a torchvision {other}, which sttn-jax does not model" if other else (
            f"keys such as {_listing(keys[:4], 4)}")
        raise CheckpointError(f"{path}: not a checkpoint of {' / '.join(archs.ARCHS)} ({what}); "
                              "give a checkpoint of one of those")
    arch = arch or found
    if num_classes is None:
        fc = state_dict.get("fc.weight")
        num_classes = int(fc.shape[0]) if fc is not None and fc.ndim == 2 and fc.shape[0] else 1000
    expected = names.by_torch_key(arch, num_classes)
    missing = [k for k, e in expected.items() if k not in state_dict and e.kind != COUNT]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match {arch}: "
                              + _key_mismatch(missing, unexpected, " keys")
                              + f"; give a complete {arch} checkpoint")
    shapes = {key: tuple(state_dict[key].shape) for key in expected if key in state_dict}
    wrong = [f"{key} {shape} (expected {expected[key].torch_shape})"
             for key, shape in shapes.items() if shape != expected[key].torch_shape
             and not (expected[key].kind == COUNT and int(np.prod(shape)) == 1)]
    if wrong:
        raise CheckpointError(f"{path}: wrong shapes for {arch}: {_listing(wrong)}; give an "
                              f"unaltered {arch} checkpoint")
    flat = {(entry.collection,) + entry.path: _to_numpy(state_dict[key], entry, path)
            if key in state_dict else np.asarray(0, dtype=np.int32)
            for key, entry in expected.items()}
    return {PARAMS: {}, BATCH_STATS: {}, **traverse_util.unflatten_dict(flat)}, arch


def load_torch_checkpoint_with_info(path, arch: str | None = None):
    """(variables, arch, info: its kind, epoch and best_prec1) of an original PyTorch checkpoint."""
    obj = read_torch_file(path)
    state_dict, info = extract_state_dict(obj, path)
    variables, arch = _convert(state_dict, arch, path, None)
    for key in ("epoch", "best_prec1"):
        value = obj.get(key) if isinstance(obj, dict) else None
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if isinstance(value, (int, float)):
            info[key] = value
    return variables, arch, info


def load_torch_checkpoint(path, arch: str | None = None, num_classes: int | None = None):
    """Flax variables of an original PyTorch checkpoint; arch, num_classes None: from the keys."""
    return state_dict_to_variables(read_state_dict(path)[0], arch, path, num_classes)
