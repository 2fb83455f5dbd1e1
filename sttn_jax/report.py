"""The merge report: what the ternary network looks like, printed as tables, saved as JSON and PNG.

`build_merge_report(bwx2_params, ternary_variables, image_size=224)` -> a JSON-able dict:

- `layers`: per merged convolution (the 16 binary pairs), the fraction of its weights at each
  level of T = alpha (sign W1 + sign W2): -2a, -a, 0, +a, +2a (the +-a levels appear only where a
  latent weight is exactly 0, sign(0) = 0), its sparsity (the 0 level), and alpha (one per output
  channel) as mean / min / max, with its MACs per image;
- `overall`: the same fractions over all ternary weights;
- `parameters`: ternary (the merged conv kernels) + full precision (everything else: conv
  biases, BatchNorm scale/bias, PReLU slopes, stem conv, fc) = the model's parameter count
  (11,530,216 for resnet18_ter at 1000 classes); BatchNorm running statistics listed apart
  (buffers, not parameters), as are the per-channel alphas (not parameters of the float model, but
  stored by the packed format);
- `size_bytes`: the model as float32 vs packed: ternary kernels at 2 bits per weight + one
  float32 alpha per output channel + every other parameter in float32 (BatchNorm running
  statistics, 4 bytes each, given apart: they fold into the BatchNorm scale/bias for inference);
- `macs`: multiply-accumulates per image at `image_size`, ternary (the merged convolutions) vs
  full precision (stem conv, fc); the elementwise BatchNorm / PReLU / pooling work is not MACs;
- `summary`: a Larq-style model summary, one row per layer (ternary / full-precision parameters,
  packed memory, ternary / full-precision MACs).

`format_report(report)` gives the printed tables; `save_json` / `save_plot` write the files
(`save_plot` draws with matplotlib's Agg backend: no display needed).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

LEVELS = ("-2a", "-a", "0", "+a", "+2a")
TERNARY_BITS = 2
FLOAT_BYTES = 4
REPORT_FORMAT = "sttn-jax merge report"


def _torch_name(flax_path: str) -> str:
    from sttn_jax.interop.names import torch_module_name

    return ".".join(torch_module_name(p) for p in flax_path.split("/"))


def _walk(tree, prefix=()):
    for name, value in tree.items():
        if hasattr(value, "items"):
            yield from _walk(value, prefix + (str(name),))
        else:
            yield prefix + (str(name),), value


def _get(tree, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


# ---------------------------------------------------------------------------------------------
# pieces


def pair_layer_stats(w1, w2) -> dict:
    """Level counts/fractions, sparsity and alpha statistics of one binary pair (HWIO latent
    kernels; clamped to [-1, 1] here, as the merge does: alpha depends on the clamp, signs not)."""
    w1 = np.clip(np.asarray(w1, np.float64), -1, 1)
    w2 = np.clip(np.asarray(w2, np.float64), -1, 1)
    levels = (np.sign(w1) + np.sign(w2)).astype(np.int64)  # in {-2, ..., 2}
    counts = np.bincount(levels.ravel() + 2, minlength=5)
    n = int(levels.size)
    fan_in = math.prod(w1.shape[:-1])
    axes = tuple(range(w1.ndim - 1))
    alpha = (np.abs(w1).sum(axis=axes) + np.abs(w2).sum(axis=axes)) / (2 * fan_in)
    return {
        "shape_hwio": [int(d) for d in w1.shape],
        "weights": n,
        "counts": {lv: int(c) for lv, c in zip(LEVELS, counts)},
        "fractions": {lv: float(c) / n for lv, c in zip(LEVELS, counts)},
        "sparsity": float(counts[2]) / n,
        "alpha": {"mean": float(alpha.mean()), "min": float(alpha.min()),
                  "max": float(alpha.max()), "channels": int(alpha.size)},
    }


def _in_order(tree, order: list[str], prefix: str = ""):
    """`tree` as nested dicts with the modules in the network's call order `order` ('/'-joined
    module paths; restored checkpoints come back sorted: features_10 before features_4)."""
    if not hasattr(tree, "items"):
        return tree
    rank = {p: i for i, p in enumerate(order)}

    def key(k):
        return rank.get(f"{prefix}/{k}" if prefix else str(k), len(rank))

    return {k: _in_order(tree[k], order, f"{prefix}/{k}" if prefix else str(k))
            for k in sorted(tree, key=key)}


def layer_calls(arch: str, num_classes: int, image_size: int, order: list | None = None) -> list[dict]:
    """Every Conv / BinaryPairConv / Dense call of `arch` on one image of `image_size`, in order:
    {"path", "type", "input_shape", "output_shape", "kernel", "macs"} (shapes only: jax.eval_shape).
    `order`, if given, receives the path of every module in the order of their first call."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sttn_jax import layers, models

    module = models.create(arch, num_classes=num_classes)
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if order is not None and context.method_name == "__call__":
            path = "/".join(mod.scope.path)
            if path and path not in order:
                order.append(path)
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(
                mod, (layers.Conv, layers.BinaryPairConv, layers.Dense)):
            x = args[0]
            cin = int(x.shape[-1])
            if isinstance(mod, layers.Dense):
                kernel = [cin, int(mod.features)]
                macs = cin * int(mod.features)
            else:
                k = int(mod.kernel_size)
                kernel = [k, k, cin, int(mod.features)]
                macs = int(out.shape[1]) * int(out.shape[2]) * k * k * cin * int(mod.features)
            calls.append({"path": "/".join(mod.scope.path), "type": type(mod).__name__,
                          "input_shape": [int(d) for d in x.shape[1:]],
                          "output_shape": [int(d) for d in out.shape[1:]],
                          "kernel": kernel, "macs": macs})
        return out

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
    # init traces each module once; keep the first record per path
    seen, unique = set(), []
    for c in calls:
        if c["path"] not in seen:
            seen.add(c["path"])
            unique.append(c)
    return unique


def _fp_category(path: tuple[str, ...], ternary_modules: set[str], params) -> str:
    module, leaf = "/".join(path[:-1]), path[-1]
    if module in ternary_modules:
        return "ternary conv biases" if leaf == "bias" else "ternary conv kernels"
    if leaf == "slope":
        return "PReLU slopes"
    parent = _get(params, module) if module else params
    if leaf == "scale" or (leaf == "bias" and "scale" in parent):
        return "BatchNorm scale/bias"
    if path[0] == "fc":
        return "fc weight/bias"
    if leaf == "kernel":
        return "full-precision conv kernels (stem)"
    return "other"


# ---------------------------------------------------------------------------------------------
# the report


def build_merge_report(bwx2_params, ternary_variables, *, image_size: int = 224,
                       source: dict | None = None, check: dict | None = None) -> dict:
    """The report of a merge: `bwx2_params` the latent model's parameters (for the levels and
    alphas), `ternary_variables` the merged model (for the counts)."""
    from sttn_jax import merging

    num_classes = int(np.shape(ternary_variables["params"]["fc"]["kernel"])[-1])
    order: list[str] = []
    calls = {c["path"]: c for c in layer_calls(merging.TERNARY, num_classes, image_size, order)}
    params = _in_order(ternary_variables["params"], order)
    pairs = merging.binary_pairs(_in_order(bwx2_params, order))
    if not pairs:
        raise ValueError("the bwx2 parameters hold no binary pairs")
    ternary_modules = {path for path, _ in pairs}

    # per layer
    layers_out = []
    for path, pair in pairs:
        stats = pair_layer_stats(pair["kernel_1"], pair["kernel_2"])
        merged_shape = list(np.shape(_get(params, path)["kernel"]))
        if merged_shape != stats["shape_hwio"]:
            raise ValueError(f"{path}: merged kernel {merged_shape} vs pair {stats['shape_hwio']}")
        call = calls[path]
        h, w, i, o = stats["shape_hwio"]
        layers_out.append({"name": _torch_name(path), "flax_path": path,
                           "torch_shape": [o, i, h, w], **stats,
                           "output_shape": call["output_shape"], "macs": call["macs"]})
    total_w = sum(layer["weights"] for layer in layers_out)
    counts = {lv: sum(layer["counts"][lv] for layer in layers_out) for lv in LEVELS}
    overall = {"ternary_weights": total_w, "counts": counts,
               "fractions": {lv: counts[lv] / total_w for lv in LEVELS},
               "sparsity": counts["0"] / total_w,
               "half_levels": counts["-a"] + counts["+a"]}

    # parameters
    breakdown: dict[str, int] = {}
    total = 0
    for path, leaf in _walk(params):
        size = int(np.size(leaf))
        total += size
        cat = _fp_category(path, ternary_modules, params)
        breakdown[cat] = breakdown.get(cat, 0) + size
    ternary = breakdown.pop("ternary conv kernels", 0)
    full = sum(breakdown.values())
    if ternary + full != total or ternary != total_w:
        raise AssertionError(f"parameter counts do not add up: {ternary} + {full} != {total}")
    stats_count = sum(int(np.size(v)) for p, v in _walk(ternary_variables.get("batch_stats", {}))
                      if p[-1] in ("mean", "var"))
    alphas = sum(layer["alpha"]["channels"] for layer in layers_out)

    # size
    packed_kernels = sum(math.ceil(layer["weights"] * TERNARY_BITS / 8) for layer in layers_out)
    size = {
        "float32": total * FLOAT_BYTES,
        "packed_ternary": packed_kernels + alphas * FLOAT_BYTES + full * FLOAT_BYTES,
        "packed_breakdown": {"ternary_kernels_2bit": packed_kernels,
                             "alphas_float32": alphas * FLOAT_BYTES,
                             "full_precision_float32": full * FLOAT_BYTES},
        "batchnorm_running_stats_float32": stats_count * FLOAT_BYTES,
        # 2 bits hold -2a / 0 / +2a; a weight at +-a (a latent weight exactly 0) needs a third bit
        "packed_2bit_exact": overall["half_levels"] == 0,
    }
    size["compression"] = size["float32"] / size["packed_ternary"]

    # MACs
    tern_macs = sum(c["macs"] for p, c in calls.items() if p in ternary_modules)
    fp_macs = sum(c["macs"] for p, c in calls.items() if p not in ternary_modules)
    macs = {"image_size": image_size, "ternary": tern_macs, "full_precision": fp_macs,
            "total": tern_macs + fp_macs, "ternary_fraction": tern_macs / (tern_macs + fp_macs)}

    return {
        "format": REPORT_FORMAT, "version": 1, "arch": merging.TERNARY, "num_classes": num_classes,
        "image_size": image_size, "source": source or {}, "check": check or {},
        "layers": layers_out, "overall": overall,
        "parameters": {"ternary": ternary, "full_precision": full, "total": total,
                       "full_precision_breakdown": breakdown,
                       "batchnorm_running_stats": stats_count, "alphas": alphas},
        "size_bytes": size, "macs": macs,
        "summary": model_summary(params, ternary_modules, calls, layers_out),
    }


def model_summary(params, ternary_modules: set[str], calls: dict, layers_out: list[dict]) -> list[dict]:
    """Larq-style rows: one per layer of the ternary model, plus the BatchNorm/PReLU of each block."""
    rows = []
    packed = {layer["flax_path"]: math.ceil(layer["weights"] * TERNARY_BITS / 8)
              + layer["alpha"]["channels"] * FLOAT_BYTES for layer in layers_out}

    def row(name, kind, path_prefixes, out_shape=None):
        tern = fp = mem = 0
        for prefix in path_prefixes:
            for p, leaf in _walk(_get(params, prefix)):
                size = int(np.size(leaf))
                if prefix in ternary_modules and p[-1] == "kernel":
                    tern += size
                else:
                    fp += size
                    mem += size * FLOAT_BYTES
            mem += packed.get(prefix, 0)
        call = calls.get(path_prefixes[0]) if len(path_prefixes) == 1 else None
        is_tern = len(path_prefixes) == 1 and path_prefixes[0] in ternary_modules
        macs = call["macs"] if call else 0
        rows.append({"layer": name, "kind": kind,
                     "output_shape": (call or {}).get("output_shape", out_shape),
                     "ternary_params": tern, "full_precision_params": fp, "memory_bytes": mem,
                     "ternary_macs": macs if is_tern else 0,
                     "full_precision_macs": 0 if is_tern else macs})

    for top in params:
        sub = params[top]
        if "conv1" in sub and "conv2" in sub:  # a BasicBlock
            for conv in ("conv1", "conv2"):
                row(_torch_name(f"{top}/{conv}"), "ternary conv 3x3", [f"{top}/{conv}"])
            others = [f"{top}/{m}" for m in sub if m not in ("conv1", "conv2")]
            row(f"{_torch_name(top)} bn/prelu", "BatchNorm x4, PReLU x2", others)
        else:
            kind = ("conv 7x7 (full precision)" if "kernel" in sub and np.ndim(sub["kernel"]) == 4
                    else "linear (full precision)" if "kernel" in sub
                    else "PReLU" if "slope" in sub else "BatchNorm")
            row(_torch_name(top), kind, [top])
    return rows


# ---------------------------------------------------------------------------------------------
# output


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} GiB"


def format_report(rep: dict) -> str:
    """The report as text tables (what merge.py prints)."""
    lines = []
    src = rep.get("source") or {}
    head = f"merge report: {rep['arch']} ({rep['num_classes']} classes)"
    if src:
        where = src.get("path", "")
        if src.get("step") is not None:
            where += f" step {src['step']}"
        head += f" from {src.get('arch', '?')} {where}"
    lines.append(head)
    lines.append("")
    lines.append("ternary weights per merged convolution: T = alpha (sign W1 + sign W2)")
    hdr = (f"  {'layer':18s} {'shape (O,I,H,W)':>17s} {'-2a':>7s} {'-a':>7s} {'0':>7s} "
           f"{'+a':>7s} {'+2a':>7s} {'alpha mean':>11s} {'min':>10s} {'max':>10s}")
    lines.append(hdr)
    for layer in rep["layers"]:
        f = layer["fractions"]
        a = layer["alpha"]
        shape = "x".join(str(d) for d in layer["torch_shape"])
        lines.append(f"  {layer['name']:18s} {shape:>17s} " + " ".join(
            f"{100 * f[lv]:6.2f}%" for lv in LEVELS)
            + f" {a['mean']:11.4e} {a['min']:10.3e} {a['max']:10.3e}")
    o = rep["overall"]
    lines.append(f"  {'all 16':18s} {o['ternary_weights']:>17,d} " + " ".join(
        f"{100 * o['fractions'][lv]:6.2f}%" for lv in LEVELS))
    lines.append(f"  overall sparsity (weights at 0): {100 * o['sparsity']:.2f}%"
                 + ("" if o["half_levels"] == 0 else
                    f"; {o['half_levels']:,d} weights at +-alpha (a latent weight exactly 0)"))
    lines.append("")
    p = rep["parameters"]
    lines.append(f"parameters: {p['total']:,d} = {p['ternary']:,d} ternary "
                 f"({100 * p['ternary'] / p['total']:.2f}%) + {p['full_precision']:,d} full precision")
    for k, v in p["full_precision_breakdown"].items():
        lines.append(f"  {k:38s} {v:>12,d}")
    lines.append(f"  (not parameters: {p['alphas']:,d} alphas, {p['batchnorm_running_stats']:,d} "
                 "BatchNorm running statistics)")
    s = rep["size_bytes"]
    pb = s["packed_breakdown"]
    lines.append(f"model size: {_human_bytes(s['float32'])} as float32, "
                 f"{_human_bytes(s['packed_ternary'])} packed "
                 f"({_human_bytes(pb['ternary_kernels_2bit'])} 2-bit kernels + "
                 f"{_human_bytes(pb['alphas_float32'])} alphas + "
                 f"{_human_bytes(pb['full_precision_float32'])} full precision): "
                 f"{s['compression']:.2f}x smaller"
                 + ("" if s["packed_2bit_exact"] else " (inexact: +-alpha levels need 3 bits)"))
    lines.append(f"  BatchNorm running statistics add {_human_bytes(s['batchnorm_running_stats_float32'])}"
                 " to either (or fold into scale/bias)")
    m = rep["macs"]
    lines.append(f"MACs per {m['image_size']}x{m['image_size']} image: {m['total'] / 1e9:.3f} G = "
                 f"{m['ternary'] / 1e9:.3f} G ternary ({100 * m['ternary_fraction']:.2f}%) + "
                 f"{m['full_precision'] / 1e9:.3f} G full precision")
    lines.append("")
    lines.append("model summary (Larq style; memory packed: 2-bit ternary kernels + float32 rest)")
    lines.append(f"  {'layer':22s} {'kind':26s} {'output':>14s} {'ternary':>11s} {'fp32':>9s} "
                 f"{'memory':>11s} {'ternary MACs':>14s} {'fp MACs':>12s}")
    for r in rep["summary"]:
        shape = "x".join(str(d) for d in r["output_shape"]) if r["output_shape"] else ""
        lines.append(f"  {r['layer']:22s} {r['kind']:26s} {shape:>14s} {r['ternary_params']:>11,d} "
                     f"{r['full_precision_params']:>9,d} {_human_bytes(r['memory_bytes']):>11s} "
                     f"{r['ternary_macs']:>14,d} {r['full_precision_macs']:>12,d}")
    tot = {k: sum(r[k] for r in rep["summary"]) for k in
           ("ternary_params", "full_precision_params", "memory_bytes", "ternary_macs",
            "full_precision_macs")}
    lines.append(f"  {'total':22s} {'':26s} {'':>14s} {tot['ternary_params']:>11,d} "
                 f"{tot['full_precision_params']:>9,d} {_human_bytes(tot['memory_bytes']):>11s} "
                 f"{tot['ternary_macs']:>14,d} {tot['full_precision_macs']:>12,d}")
    return "\n".join(lines)


def save_json(rep: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=2) + "\n")
    return path


def save_plot(rep: dict, path) -> Path:
    """A PNG: level fractions per layer, alpha per layer, size and MACs (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = rep["layers"]
    names = [layer["name"].replace("features.", "").replace(".conv", ".") for layer in layers]
    x = np.arange(len(layers))
    fig = Figure(figsize=(13, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    axes = fig.subplots(2, 2, gridspec_kw={"width_ratios": [3, 1]})

    ax = axes[0, 0]
    colours = {"-2a": "#2b6cb0", "-a": "#90cdf4", "0": "#cbd5e0", "+a": "#fbb6ce", "+2a": "#c53030"}
    bottom = np.zeros(len(layers))
    for lv in LEVELS:
        vals = np.array([layer["fractions"][lv] for layer in layers])
        label = {"-2a": "-2α", "-a": "-α", "0": "0", "+a": "+α", "+2a": "+2α"}[lv]
        ax.bar(x, vals, bottom=bottom, color=colours[lv], label=label, width=0.8)
        bottom += vals
    for xi, layer in zip(x, layers):
        ax.text(xi, layer["fractions"]["-2a"] + layer["fractions"]["-a"] + layer["fractions"]["0"] / 2,
                f"{100 * layer['sparsity']:.0f}%", ha="center", va="center", fontsize=7)
    ax.set_xticks(x, names, rotation=60, fontsize=8)
    ax.set_xlabel("merged convolution (block.conv: features.N.convK)", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("fraction of weights")
    ax.set_title(f"ternary levels per merged convolution (overall sparsity "
                 f"{100 * rep['overall']['sparsity']:.1f}%)")
    ax.legend(loc="upper center", fontsize=8, ncol=5, frameon=False)

    ax = axes[1, 0]
    mean = np.array([layer["alpha"]["mean"] for layer in layers])
    lo = np.array([layer["alpha"]["min"] for layer in layers])
    hi = np.array([layer["alpha"]["max"] for layer in layers])
    ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=3, color="#2d3748")
    ax.set_xticks(x, names, rotation=60, fontsize=8)
    if np.all(lo > 0):
        ax.set_yscale("log")
    ax.set_ylabel("α per output channel")
    ax.set_title("α: mean, min–max over output channels")

    ax = axes[0, 1]
    s = rep["size_bytes"]
    vals = [s["float32"] / 2**20, s["packed_ternary"] / 2**20]
    bars = ax.bar(["float32", "packed\n2-bit"], vals, color=["#718096", "#2f855a"])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f} MiB", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(f"model size ({s['compression']:.1f}x smaller)")

    ax = axes[1, 1]
    m = rep["macs"]
    vals = [m["ternary"] / 1e6, m["full_precision"] / 1e6]
    bars = ax.bar(["ternary", "full\nprecision"], vals, color=["#2f855a", "#718096"])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.1f} M", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MMACs per image")
    ax.set_title(f"MACs at {m['image_size']}x{m['image_size']}")

    p = rep["parameters"]
    fig.suptitle(f"{rep['arch']}: {p['total']:,d} parameters = {p['ternary']:,d} ternary + "
                 f"{p['full_precision']:,d} full precision")
    fig.savefig(path, format="png")
    return path
