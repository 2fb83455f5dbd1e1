"""The merge report: what the merged ternary network looks like, as a JSON-able dict
(`build_merge_report`), as text (`format_report`, `layer_table`) and as a plot (`save_plot`): per
merged convolution its weights at each level -2a, -a, 0, +a, +2a (+-a only where a latent weight
is exactly 0) and its alphas; ternary vs full-precision parameters (BatchNorm statistics and alphas
counted apart), float32 vs packed size, and MACs per image.
"""

import math
from pathlib import Path

import flax.linen as nn
import humanize
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import ops
from sttn_jax import archs, layers, model_trees, models, packed
from sttn_jax.interop.names import torch_module_name

LEVELS = ("-2a", "-a", "0", "+a", "+2a")
FLOAT_BYTES = 4
REPORT_FORMAT = "sttn-jax merge report"


def pair_layer_stats(w1, w2) -> dict:
    """Level counts/fractions, sparsity and alpha statistics of one binary pair (HWIO latent
    kernels, clamped to [-1, 1] as the merge does)."""
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
    """The report of a merge of `bwx2_params` (levels, alphas) into `ternary_variables` (counts)."""
    num_classes = model_trees.num_classes_of(ternary_variables["params"])
    calls = {c["path"]: c for c in layer_calls(archs.TERNARY, num_classes, image_size)}
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
        "format": REPORT_FORMAT, "version": 1, "arch": archs.TERNARY, "num_classes": num_classes,
        "image_size": image_size, "source": source or {}, "check": check or {},
        "layers": layers_out, "overall": overall,
        "parameters": {"ternary": ternary, "full_precision": total - ternary, "total": total,
                       "full_precision_breakdown": breakdown,
                       "batchnorm_running_stats": stats_count, "alphas": alphas},
        "size_bytes": size, "macs": macs,
    }


def _size(n: float) -> str:
    return humanize.naturalsize(n, binary=True, format="%.2f")


def layer_table(num_classes: int, image_size: int) -> str:
    """The merged network module by module: shapes, parameters and FLOPs per image."""
    module = models.create(archs.TERNARY, num_classes)
    return nn.tabulate(module, jax.random.key(0), depth=1, compute_flops=True,
                       console_kwargs={"force_terminal": False, "width": 140})(
        jnp.zeros((1, image_size, image_size, 3)), train=False)


def format_report(rep: dict) -> str:
    """The report as text tables (what merge.py prints)."""
    src = rep.get("source") or {}
    head = f"merge report: {rep['arch']} ({rep['num_classes']} classes)"
    if src:
        step = f" step {src['step']}" if src.get("step") is not None else ""
        head += f" from {src.get('arch', '?')} {src.get('path', '')}{step}"
    lines = [head, "", "ternary weights per merged convolution: T = alpha (sign W1 + sign W2)",
             f"  {'layer':18s} {'shape (O,I,H,W)':>17s} {'-2a':>7s} {'-a':>7s} {'0':>7s} "
             f"{'+a':>7s} {'+2a':>7s} {'alpha mean':>11s} {'min':>10s} {'max':>10s}"]
    for layer in rep["layers"]:
        f, a = layer["fractions"], layer["alpha"]
        shape = "x".join(str(d) for d in layer["torch_shape"])
        lines.append(f"  {layer['name']:18s} {shape:>17s} " + " ".join(
            f"{100 * f[lv]:6.2f}%" for lv in LEVELS)
            + f" {a['mean']:11.4e} {a['min']:10.3e} {a['max']:10.3e}")
    o = rep["overall"]
    lines.append(f"  {'all 16':18s} {o['ternary_weights']:>17,d} " + " ".join(
        f"{100 * o['fractions'][lv]:6.2f}%" for lv in LEVELS))
    lines += [f"  overall sparsity (weights at 0): {100 * o['sparsity']:.2f}%"
              + ("" if o["half_levels"] == 0 else
                 f"; {o['half_levels']:,d} weights at +-alpha (a latent weight exactly 0)"), ""]
    p = rep["parameters"]
    lines.append(f"parameters: {p['total']:,d} = {p['ternary']:,d} ternary "
                 f"({100 * p['ternary'] / p['total']:.2f}%) + {p['full_precision']:,d} full precision")
    lines += [f"  {k:38s} {v:>12,d}" for k, v in p["full_precision_breakdown"].items()]
    lines.append(f"  (not parameters: {p['alphas']:,d} alphas, {p['batchnorm_running_stats']:,d} "
                 "BatchNorm running statistics)")
    s, pb = rep["size_bytes"], rep["size_bytes"]["packed_breakdown"]
    lines.append(f"model size: {_size(s['float32'])} of float32 parameters, "
                 f"{_size(s['packed_ternary'])} packed ({_size(pb['codes'])} 2-bit kernels + "
                 f"{_size(pb['alphas'])} alphas + {_size(pb['half_signs'])} +-alpha signs + "
                 f"{_size(pb['float32'] + pb['int32'])} the rest, BatchNorm statistics included): "
                 f"{s['compression']:.2f}x smaller")
    m = rep["macs"]
    lines.append(f"MACs per {m['image_size']}x{m['image_size']} image: {m['total'] / 1e9:.3f} G = "
                 f"{m['ternary'] / 1e9:.3f} G ternary ({100 * m['ternary_fraction']:.2f}%) + "
                 f"{m['full_precision'] / 1e9:.3f} G full precision")
    return "\n".join(lines)


def save_plot(rep: dict, path) -> Path:
    """The report as a PNG (matplotlib's Agg backend: pyplot's global state untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    convs, x = rep["layers"], np.arange(len(rep["layers"]))
    names = [layer["name"].replace("features.", "").replace(".conv", ".") for layer in convs]
    fig = Figure(figsize=(13, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (levels, sizes), (alphas, macs) = fig.subplots(2, 2, gridspec_kw={"width_ratios": [3, 1]})
    bottom = np.zeros(len(convs))
    for lv, colour in zip(LEVELS, ("#2b6cb0", "#90cdf4", "#cbd5e0", "#fbb6ce", "#c53030")):
        values = np.array([layer["fractions"][lv] for layer in convs])
        levels.bar(x, values, bottom=bottom, color=colour, label=lv.replace("a", "α"))
        bottom += values
    for xi, layer in zip(x, convs):
        levels.text(xi, 0.5, f"{100 * layer['sparsity']:.0f}%", ha="center", fontsize=7)
    levels.legend(loc="upper center", fontsize=8, ncol=5, frameon=False)
    levels.set(ylim=(0, 1.1), ylabel="fraction of weights", title="ternary levels per merged "
               f"convolution (overall sparsity {100 * rep['overall']['sparsity']:.1f}%)")
    mean, lo, hi = (np.array([layer["alpha"][k] for layer in convs]) for k in ("mean", "min", "max"))
    alphas.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=3, color="#2d3748")
    alphas.set(ylabel="α per output channel", title="α: mean, min–max over output channels",
               yscale="log" if np.all(lo > 0) else "linear")
    for ax in (levels, alphas):
        ax.set_xticks(x, names, rotation=60, fontsize=8)
    s, m = rep["size_bytes"], rep["macs"]
    for ax, labels, values, unit, title in (
            (sizes, ["float32", "packed"], [s["float32"] / 2**20, s["packed_ternary"] / 2**20],
             "MiB", f"model size ({s['compression']:.1f}x smaller)"),
            (macs, ["ternary", "full\nprecision"], [m["ternary"] / 1e6, m["full_precision"] / 1e6],
             "MMACs", f"MACs per image at {m['image_size']}x{m['image_size']}")):
        bars = ax.bar(labels, values, color=["#718096", "#2f855a"])
        ax.bar_label(bars, [f"{v:,.2f} {unit}" for v in values], fontsize=8)
        ax.set(ylabel=unit, title=title)
    p = rep["parameters"]
    fig.suptitle(f"{rep['arch']}: {p['total']:,d} parameters = {p['ternary']:,d} ternary + "
                 f"{p['full_precision']:,d} full precision")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return Path(path)
