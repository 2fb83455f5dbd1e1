"""The merge report (`sttn_jax.report`) as text tables and as a PNG (matplotlib's Agg backend:
no display needed), and the merged network's layer table (`flax.linen.tabulate`)."""
from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import humanize
import jax
import jax.numpy as jnp
import numpy as np

from sttn_jax import models
from sttn_jax.report import LEVELS


def _size(n: float) -> str:
    return humanize.naturalsize(n, binary=True, format="%.2f")


def layer_table(num_classes: int, image_size: int) -> str:
    """The merged network module by module: shapes, parameters and FLOPs per image."""
    module = models.create(models.TERNARY, num_classes)
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
    """A PNG (matplotlib's Agg backend, pyplot's global state untouched): the ternary levels of
    every merged convolution with its sparsity, its alphas, and the model's size and MACs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, x = rep["layers"], np.arange(len(rep["layers"]))
    names = [layer["name"].replace("features.", "").replace(".conv", ".") for layer in layers]
    fig = Figure(figsize=(13, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (levels, sizes), (alphas, macs) = fig.subplots(2, 2, gridspec_kw={"width_ratios": [3, 1]})
    bottom = np.zeros(len(layers))
    for lv, colour in zip(LEVELS, ("#2b6cb0", "#90cdf4", "#cbd5e0", "#fbb6ce", "#c53030")):
        values = np.array([layer["fractions"][lv] for layer in layers])
        levels.bar(x, values, bottom=bottom, color=colour, label=lv.replace("a", "α"))
        bottom += values
    for xi, layer in zip(x, layers):
        levels.text(xi, 0.5, f"{100 * layer['sparsity']:.0f}%", ha="center", fontsize=7)
    levels.legend(loc="upper center", fontsize=8, ncol=5, frameon=False)
    levels.set(ylim=(0, 1.1), ylabel="fraction of weights", title="ternary levels per merged "
               f"convolution (overall sparsity {100 * rep['overall']['sparsity']:.1f}%)")
    mean, lo, hi = (np.array([layer["alpha"][k] for layer in layers]) for k in ("mean", "min", "max"))
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
