"""The packed model file: a merged resnet18_ter model with its 16 ternary kernels at 2 bits a weight.

An uncompressed .npz (nothing pickled; a CRC-32 per member) of flat arrays in the model's order:
"header" (JSON bytes); "codes", four 2-bit fields a byte (0: 0, 1: +2a, 2: -2a, 3: +-a, its sign
the next bit of "half_signs"); "alphas" (float32 per output channel); "float32" and "int32", every
other tensor raveled. Names and shapes come from the model; `read` checks every size.
"""

import json
import os
import zipfile
from pathlib import Path

import numpy as np
from flax import traverse_util

from sttn_jax import archs, json_io, model_trees, quantize
from sttn_jax.errors import CheckpointError

FORMAT, VERSION = "sttn-jax packed model", 1
FIELD_OF_CODE = np.array([2, 3, 0, 3, 1], np.uint8)  # the 2-bit field of codes -2 .. 2
CODE_OF_FIELD = np.array([0, 2, -2, 0], np.int8)      # and back (field 3: +-1, by its sign bit)
SHIFTS = np.array([0, 2, 4, 6], np.uint8)
REWRITE = "write it again: merge the resnet18_bwx2 model again with a packed output (merge.py)"


def layout(num_classes: int) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every tensor of a resnet18_ter model, in the model's order."""
    return [(k, tuple(v.shape), np.dtype(v.dtype))
            for k, v in model_trees.variable_shapes(archs.TERNARY, num_classes).items()]


# The names of the 16 ternary kernels, stored as 2-bit codes and alphas.
TERNARY_KERNELS = {f"params/{path}/kernel" for path in quantize.ternary_conv_paths()}


def _pack(variables) -> dict[str, np.ndarray]:
    """The archive's arrays (all but the header); ValueError for what the format cannot hold."""
    flat = traverse_util.flatten_dict({k: dict(variables.get(k, {}))
                                       for k in ("params", "batch_stats")}, sep="/")
    want = layout(model_trees.num_classes_of(variables["params"]))
    if set(flat) != {name for name, _, _ in want}:
        raise ValueError(f"these variables are not a merged {archs.TERNARY} model; "
                         f"{quantize.MERGE_FIX}")
    fields, signs, alphas, floats, ints = [], [], [], [], []
    for name, shape, dtype in want:
        leaf = np.asarray(flat[name])
        if leaf.shape != shape or leaf.dtype != dtype:
            raise ValueError(f"{name} is {leaf.dtype}{list(leaf.shape)}, not {dtype}{list(shape)} "
                             "(merge.py writes float32 models)")
        if name in TERNARY_KERNELS:
            codes, scale = quantize.ternary_codes(leaf, name=name)
            fields.append(FIELD_OF_CODE[codes.ravel().astype(np.int64) + 2])
            signs.append(codes[np.abs(codes) == 1] < 0)
            alphas.append(scale)
        else:
            (floats if dtype == np.float32 else ints).append(leaf.ravel())
    fields = np.concatenate(fields)
    fields = np.concatenate([fields, np.zeros(-fields.size % 4, np.uint8)]).reshape(-1, 4)
    return {"codes": np.bitwise_or.reduce(fields << SHIFTS, axis=1).astype(np.uint8),
            "half_signs": np.packbits(np.concatenate(signs)), "alphas": np.concatenate(alphas),
            "float32": np.concatenate(floats), "int32": np.concatenate(ints)}


def payload_breakdown(variables) -> dict[str, int]:
    """The bytes of each part of the tensor data in the packed file of `variables`."""
    return {k: int(a.nbytes) for k, a in _pack(variables).items()}


def write(path, variables, arch: str = archs.TERNARY, meta: dict | None = None) -> Path:
    """Writes the merged `variables` as a packed file at `path`, whole (CheckpointError if not)."""
    path = Path(path)
    if arch != archs.TERNARY:
        raise CheckpointError(f"{path}: the packed format holds {archs.TERNARY} models, not "
                              f"{arch}; merge a resnet18_bwx2 first (merge.py)")
    try:
        arrays = _pack(variables)
        header = json.dumps({"format": FORMAT, "version": VERSION, "arch": arch, "meta": meta or {},
                             "num_classes": model_trees.num_classes_of(variables["params"])},
                            allow_nan=False).encode()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not written: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with json_io.written_aside(path) as staged, open(staged, "wb") as f:
        np.savez(f, header=np.frombuffer(header, np.uint8), **arrays)
        f.flush()
        os.fsync(f.fileno())
    return path


def is_packed_file(path) -> bool:
    """Whether `path` is a packed model file (a zip holding our header; a torch file is a zip too)."""
    try:
        with zipfile.ZipFile(path) as z:
            return "header.npy" in z.namelist()
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):  # ValueError: a name not UTF-8
        return False


def _unpack(arrays: dict, num_classes: int) -> dict:
    want = layout(num_classes)
    ternary = [(n, s) for n, s, _ in want if n in TERNARY_KERNELS]
    n_weights = sum(int(np.prod(s)) for _, s in ternary)
    fields = ((arrays["codes"][:, None] >> SHIFTS) & 3).reshape(-1)
    halves = fields[:n_weights] == 3
    sizes = {"codes": (n_weights + 3) // 4, "alphas": sum(s[-1] for _, s in ternary),
             "half_signs": (int(halves.sum()) + 7) // 8,
             "float32": sum(int(np.prod(s)) for n, s, d in want
                            if n not in TERNARY_KERNELS and d == np.float32),
             "int32": sum(int(np.prod(s)) for n, s, d in want if d == np.int32)}
    wrong = [k for k, n in sizes.items() if arrays[k].ndim != 1 or arrays[k].size != n]
    if wrong or arrays["alphas"].dtype != np.float32 or arrays["float32"].dtype != np.float32 \
            or arrays["int32"].dtype != np.int32 or arrays["codes"].dtype != np.uint8:
        raise ValueError(f"its {', '.join(wrong) or 'dtypes'} do not fit a {num_classes}-class "
                         f"{archs.TERNARY} model")
    codes = CODE_OF_FIELD[fields[:n_weights]]
    codes[halves] = np.where(np.unpackbits(arrays["half_signs"])[:int(halves.sum())], -1, 1)
    offsets = {"codes": 0, "alphas": 0, "float32": 0, "int32": 0}
    flat = {}
    for name, shape, dtype in want:
        n = int(np.prod(shape))
        if name in TERNARY_KERNELS:
            c = codes[offsets["codes"]:offsets["codes"] + n].reshape(shape)
            a = arrays["alphas"][offsets["alphas"]:offsets["alphas"] + shape[-1]]
            flat[name] = quantize.kernel_from_codes(c, a, dtype)
            offsets["codes"] += n
            offsets["alphas"] += shape[-1]
        else:
            key = "float32" if dtype == np.float32 else "int32"
            flat[name] = arrays[key][offsets[key]:offsets[key] + n].reshape(shape).copy()
            offsets[key] += n
    return traverse_util.unflatten_dict(flat, sep="/")


def read(path) -> tuple[dict, str, dict]:
    """(variables, arch, meta) of the packed file at `path`; CheckpointError for anything else."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        header = json.loads(arrays.pop("header").tobytes())
        if header.get("format") != FORMAT or header.get("arch") != archs.TERNARY:
            raise ValueError("not a packed sttn-jax model")
        if header.get("version") != VERSION:
            raise ValueError(f"format version {header.get('version')!r}; this sttn-jax reads "
                             f"version {VERSION}")
        variables = _unpack(arrays, int(header["num_classes"]))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file becomes one message
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{path}: not a readable packed model file ({detail}); {REWRITE}") \
            from None
    return variables, header["arch"], header["meta"]
