"""The merge report: what the merged ternary network looks like, as a JSON-able dict.

`build_merge_report(bwx2_params, ternary_variables, image_size=224)` gives
- `layers`: per merged convolution (the 16 binary pairs), the fraction of its weights at each level
  -2a, -a, 0, +a, +2a of T = alpha (sign W1 + sign W2) (+-a only where a latent weight is exactly
  0, sign(0) = 0), its sparsity (the 0 level), alpha per output channel (mean / min / max) and its
  MACs per image; `overall`: the same fractions over all ternary weights;
- `parameters`: ternary (the merged conv kernels) + full precision (the rest) = the model's
  parameter count (11,530,216 for resnet18_ter at 1000 classes); BatchNorm running statistics and
  alphas are counted apart (not parameters of the float model);
- `size_bytes`: the float32 parameters vs the packed model file's tensor data (`sttn_jax.packed`,
  BatchNorm running statistics included);
- `macs`: per image at `image_size`, ternary (the merged convolutions) vs full precision (stem, fc).
`sttn_jax.report_format` prints and plots it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import ops
from sttn_jax import layers, models, packed
from sttn_jax.interop.names import torch_module_name

LEVELS = ("-2a", "-a", "0", "+a", "+2a")
FLOAT_BYTES = 4
REPORT_FORMAT = "sttn-jax merge report"


def pair_layer_stats(w1, w2) -> dict:
    """Level counts/fractions, sparsity and alpha statistics of one binary pair (HWIO latent
    kernels; clamped to [-1, 1] here, as the merge does: alpha depends on the clamp, signs not)."""
    w1, w2 = (np.clip(np.asarray(w, np.float64), -1, 1) for w in (w1, w2))
    levels = (np.sign(w1) + np.sign(w2)).astype(np.int64)  # in {-2, ..., 2}
    counts = np.bincount(levels.ravel() + 2, minlength=5)
    n = int(levels.size)
    axes = tuple(range(w1.ndim - 1))
    alpha = (np.abs(w1).sum(axis=axes) + np.abs(w2).sum(axis=axes)) / (2 * math.prod(w1.shape[:-1]))
    return {
        "shape_hwio": [int(d) for d in w1.shape],
        "weights": n,
        "counts": {lv: int(c) for lv, c in zip(LEVELS, counts)},
        "fractions": {lv: float(c) / n for lv, c in zip(LEVELS, counts)},
        "sparsity": float(counts[2]) / n,
        "alpha": {"mean": float(alpha.mean()), "min": float(alpha.min()),
                  "max": float(alpha.max()), "channels": int(alpha.size)},
    }


def layer_calls(arch: str, num_classes: int, image_size: int) -> list[dict]:
    """Every Conv / BinaryPairConv / Dense call of `arch` on one image of `image_size`, in order:
    {"path", "type", "input_shape", "output_shape", "kernel", "macs"} (shapes only: jax.eval_shape)."""
    module = models.create(arch, num_classes=num_classes)
    calls = {}  # by path: init traces each module once, keep the first record anyway

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(
                mod, (layers.Conv, layers.BinaryPairConv, layers.Dense)):
            x, path = args[0], "/".join(mod.scope.path)
            kernel = [int(x.shape[-1]), int(mod.features)]
            if not isinstance(mod, layers.Dense):
                kernel = [int(mod.kernel_size)] * 2 + kernel
            calls.setdefault(path, {  # macs: kernel weights times output positions
                "path": path, "type": type(mod).__name__,
                "input_shape": [int(d) for d in x.shape[1:]],
                "output_shape": [int(d) for d in out.shape[1:]],
                "kernel": kernel, "macs": math.prod(kernel) * math.prod(out.shape[1:-1])})
        return out

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
    return list(calls.values())


def _category(key: tuple[str, ...], ternary_modules: set[str], flat: dict) -> str:
    module, leaf = "/".join(key[:-1]), key[-1]
    if module in ternary_modules:
        return "ternary conv biases" if leaf == "bias" else "ternary conv kernels"
    if leaf == "slope":
        return "PReLU slopes"
    if leaf in ("scale", "bias") and key[:-1] + ("scale",) in flat:
        return "BatchNorm scale/bias"
    if key[0] == "fc":
        return "fc weight/bias"
    return "full-precision conv kernels (stem)" if leaf == "kernel" else "other"


def build_merge_report(bwx2_params, ternary_variables, *, image_size: int = 224,
                       source: dict | None = None, check: dict | None = None) -> dict:
    """The report of a merge: `bwx2_params` the latent model's parameters (for the levels and
    alphas), `ternary_variables` the merged model (for the counts)."""
    num_classes = models.num_classes_of(ternary_variables["params"])
    calls = {c["path"]: c for c in layer_calls(models.TERNARY, num_classes, image_size)}
    pairs = dict(ops.binary_pairs(bwx2_params))
    if not pairs:
        raise ValueError("the bwx2 parameters hold no binary pairs")
    flat = traverse_util.flatten_dict(dict(ternary_variables["params"]))
    layers_out = []
    for path in (p for p in calls if p in pairs):  # in the network's order
        stats = pair_layer_stats(pairs[path]["kernel_1"], pairs[path]["kernel_2"])
        merged_shape = list(np.shape(flat[tuple(path.split("/")) + ("kernel",)]))
        if merged_shape != stats["shape_hwio"]:
            raise ValueError(f"{path}: merged kernel {merged_shape} vs pair {stats['shape_hwio']}")
        h, w, i, o = stats["shape_hwio"]
        layers_out.append({"name": ".".join(torch_module_name(p) for p in path.split("/")),
                           "flax_path": path, "torch_shape": [o, i, h, w], **stats,
                           "output_shape": calls[path]["output_shape"],
                           "macs": calls[path]["macs"]})
    total_w = sum(layer["weights"] for layer in layers_out)
    counts = {lv: sum(layer["counts"][lv] for layer in layers_out) for lv in LEVELS}
    overall = {"ternary_weights": total_w, "counts": counts,
               "fractions": {lv: counts[lv] / total_w for lv in LEVELS},
               "sparsity": counts["0"] / total_w,
               "half_levels": counts["-a"] + counts["+a"]}

    breakdown: dict[str, int] = {}
    for key, leaf in flat.items():
        cat = _category(key, set(pairs), flat)
        breakdown[cat] = breakdown.get(cat, 0) + int(np.size(leaf))
    total = sum(breakdown.values())
    ternary = breakdown.pop("ternary conv kernels", 0)
    if ternary != total_w:
        raise AssertionError(f"parameter counts do not add up: {ternary} ternary kernel weights "
                             f"vs {total_w} in the pairs")
    stats_count = sum(int(np.size(v)) for k, v in traverse_util.flatten_dict(
        dict(ternary_variables.get("batch_stats", {}))).items() if k[-1] in ("mean", "var"))
    alphas = sum(layer["alpha"]["channels"] for layer in layers_out)

    parts = packed.payload_breakdown(jax.tree_util.tree_map(  # the file stores float32 models
        lambda a: np.asarray(a, np.float32) if np.asarray(a).dtype.kind == "f" else a,
        ternary_variables))
    size = {"float32": total * FLOAT_BYTES, "packed_ternary": sum(parts.values()),
            "packed_breakdown": parts, "batchnorm_running_stats_float32": stats_count * FLOAT_BYTES}
    size["compression"] = size["float32"] / size["packed_ternary"]

    tern_macs = sum(c["macs"] for p, c in calls.items() if p in pairs)
    fp_macs = sum(c["macs"] for p, c in calls.items() if p not in pairs)
    macs = {"image_size": image_size, "ternary": tern_macs, "full_precision": fp_macs,
            "total": tern_macs + fp_macs, "ternary_fraction": tern_macs / (tern_macs + fp_macs)}
    return {
        "format": REPORT_FORMAT, "version": 1, "arch": models.TERNARY, "num_classes": num_classes,
        "image_size": image_size, "source": source or {}, "check": check or {},
        "layers": layers_out, "overall": overall,
        "parameters": {"ternary": ternary, "full_precision": total - ternary, "total": total,
                       "full_precision_breakdown": breakdown,
                       "batchnorm_running_stats": stats_count, "alphas": alphas},
        "size_bytes": size, "macs": macs,
    }


def save_json(rep: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=2) + "\n")
    return path
