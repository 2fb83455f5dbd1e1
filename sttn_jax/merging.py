"""bwx2 -> ternary: each binary pair becomes one ternary convolution, weight = alpha (sign W1 +
sign W2), bias = b1 + b2; every other tensor is copied. `merge_checkpoint` is what merge.py does.
The kernel is folded by the same jitted op as the bwx2 forward, so the logits are bit-identical
(an eager fold may differ in the last bit of an alpha, enough to flip an activation at +-0.5).
"""

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import ops
from sttn_jax import archs, interop, json_io, merge_report, model_io, model_trees
from sttn_jax import packed as packed_lib
from sttn_jax.errors import CheckpointError, ConfigError, MergeCheckError
from sttn_jax.interop import parity

MERGE_TOLERANCE = 1e-5        # max|delta logit| / max|bwx2 logit|, float32
DEFAULT_CHECK_BATCH = 8
DEFAULT_IMAGE_SIZE = 224
BWX2, TERNARY = archs.BWX2, archs.TERNARY
REPORT_JSON = "merge_report.json"
REPORT_PNG = "merge_report.png"
LAYER_TABLE = "layers.txt"  # the merged network module by module (flax tabulate): 140 columns


@jax.jit
def _fold_clamped(w1, w2):
    """The ternary kernel of one pair, as the bwx2 forward computes it (jitted: same rounding)."""
    return ops.fold_binary_pair(jnp.clip(w1, -1, 1), jnp.clip(w2, -1, 1))


def merge_variables(variables):
    """{"params", "batch_stats"} of a resnet18_ter model from those of a resnet18_bwx2 model, the
    latent kernels clamped to [-1, 1] first as the original does before every binarization."""
    pairs = dict(ops.binary_pairs(variables["params"]))
    if not pairs:
        raise ValueError("these variables hold no binary pairs (kernel_1/kernel_2): not a "
                         "resnet18_bwx2 model")
    flat = {}
    for key, value in traverse_util.flatten_dict(dict(variables["params"]), sep="/").items():
        module = key.rsplit("/", 1)[0]
        if module not in pairs:
            flat[key] = np.asarray(value)
        elif f"{module}/kernel" not in flat:  # the pair's first leaf: the merged conv takes its place
            pair = pairs[module]
            kernel = _fold_clamped(jnp.asarray(pair["kernel_1"]), jnp.asarray(pair["kernel_2"]))
            flat[f"{module}/kernel"] = np.asarray(kernel)
            flat[f"{module}/bias"] = np.asarray(pair["bias_1"]) + np.asarray(pair["bias_2"])
    return {"params": traverse_util.unflatten_dict(flat, sep="/"),
            "batch_stats": variables.get("batch_stats", {})}


def check_merge(bwx2_variables, ternary_variables, *, batch: int = DEFAULT_CHECK_BATCH,
                image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                tolerance: float = MERGE_TOLERANCE, act_backend: str = "auto"):
    """A `parity.ParityResult` of the ternary logits against the bwx2 ones (eval mode, float32,
    latent kernels clamped) on `batch` random normal images."""
    if batch < 1:
        raise ConfigError(f"the merge check needs a batch of at least 1 image, got {batch}")
    if problem := archs.image_size_problem(image_size):
        raise ConfigError(f"the merge check's image size {image_size}: {problem}")
    images = np.random.default_rng(seed).standard_normal((batch, image_size, image_size, 3),
                                                         dtype=np.float32)
    num_classes = model_trees.num_classes_of(bwx2_variables["params"])
    bw = {"params": ops.clamp_latent_kernels(bwx2_variables["params"]),
          "batch_stats": bwx2_variables.get("batch_stats", {})}
    a = np.asarray(parity.eval_fn(BWX2, num_classes, "float32", act_backend)(bw, images))
    b = np.asarray(parity.eval_fn(TERNARY, num_classes, "float32", act_backend)(ternary_variables,
                                                                               images))
    return parity.compare(b, a, "float32", tolerance)


@dataclasses.dataclass
class MergeResult:
    out: Path
    torch_out: Path | None
    check: parity.ParityResult
    report: dict
    source: model_io.LoadedModel
    plot: Path | None


def _check_destinations(out: Path, source_path: Path, files: dict) -> None:
    """Refuses, before any work, outputs that cannot be written (`files`: parameter name -> path or
    None): over the source or each other, on directories, unwritable, or torch missing."""
    if out == source_path or out in source_path.parents:
        raise CheckpointError(f"the output directory {out} would overwrite the source "
                              f"{source_path}; pick a new directory")
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"the output directory {out} is a file; give a directory for "
                                  "the model checkpoint")
        if any(out.iterdir()) and not model_io.is_model_checkpoint(out):
            raise CheckpointError(f"the output directory {out} exists and is not a model "
                                  "checkpoint; pick a new directory (an existing model checkpoint "
                                  "is replaced)")
    given = {name: Path(path).absolute() for name, path in files.items() if path is not None}
    for name, path in given.items():
        if path.is_dir():
            raise CheckpointError(f"{name} {path} is a directory; give a file name")
        if path == out or out in path.parents:
            raise CheckpointError(f"{name} {path} lies in the output directory {out}, which is "
                                  "replaced as a whole; give a path outside it")
    if len(set(given.values())) < len(given):
        raise CheckpointError(f"{' and '.join(given)} name the same file {next(iter(given.values()))}"
                              "; give each its own")
    for name, path in {"the output directory": out, **given}.items():
        parent = next(p for p in path.parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise CheckpointError(f"{name} {path} cannot be written ({parent} is not a writable "
                                  "directory); pick another place")
    if given.get("torch_out") is not None:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"torch_out {given['torch_out']} (the original's PyTorch format) "
                              f"needs torch: pip install 'sttn-jax[torch]', or leave it out "
                              f"(import failed: {e})") from None


def merge_checkpoint(source, out, *, torch_out=None, packed=None, step: int | None = None,
                     batch: int = DEFAULT_CHECK_BATCH, image_size: int | None = None,
                     seed: int = 0, tolerance: float = MERGE_TOLERANCE, plot: bool = True,
                     echo: Callable[[str], None] = print) -> MergeResult:
    """Loads the resnet18_bwx2 model at `source`, merges it, checks the logits, and only if the
    check passes writes `out` (a model checkpoint with its report), `torch_out` (the original's
    format) and `packed` (the 2-bit file). image_size None: the run's, else 224."""
    loaded = model_io.load(source, step=step)
    if loaded.arch != BWX2:
        what = {"resnet18_ter": "an already merged ternary model",
                "resnet50": "the ResNet-50 teacher"}.get(loaded.arch, loaded.arch)
        raise CheckpointError(f"{loaded.path}: holds a {loaded.arch} model ({what}), not "
                              f"{BWX2}; merge.py merges the binary pairs of a {BWX2} checkpoint")
    out = Path(out).absolute()
    _check_destinations(out, Path(loaded.path), {"torch_out": torch_out, "packed": packed})
    if image_size is None:
        image_size = loaded.image_size or DEFAULT_IMAGE_SIZE
    echo(f"loaded {loaded.describe()}")

    merged = merge_variables(loaded.variables)
    check = check_merge(loaded.variables, merged, batch=batch, image_size=image_size, seed=seed,
                        tolerance=tolerance)
    echo(f"merge check: resnet18_bwx2 vs merged resnet18_ter, {batch} random normal images "
         f"{image_size}x{image_size} (seed {seed}), float32\n  {check.format()}")
    if not check.passed:
        raise MergeCheckError(
            f"the merged model's logits differ from the bwx2 model's by {check.relative_error:.3e} "
            f"relative (max|dlogit| {check.max_abs_diff:.3e}), above the tolerance "
            f"{tolerance:g}: refusing to write {out}")

    rep = merge_report.build_merge_report(loaded.variables["params"], merged,
                                          image_size=image_size, source=loaded.info(),
                                          check=check.as_dict())
    extra = {"merged_from": loaded.info(), "merge_check": check.as_dict(),
             "num_classes": loaded.num_classes, "report": REPORT_JSON}
    if loaded.run_config:  # what evaluating the merged model needs to know of its data
        extra["config"] = loaded.run_config
    outputs = {out: json_io.staged_path(out)}
    outputs.update({Path(f): json_io.staged_path(Path(f)) for f in (packed, torch_out)
                    if f is not None})
    try:  # everything written aside first, renamed into place only when all of it is complete
        if packed is not None:  # first: it refuses what its format cannot hold
            packed_lib.write(outputs[Path(packed)], merged, TERNARY, meta=extra)
        stage = outputs[out]
        model_io.save(stage, merged, TERNARY, extra=extra)
        json_io.write_json(rep, stage / REPORT_JSON)
        plot_path = None
        if plot:
            try:
                plot_path = merge_report.save_plot(rep, stage / REPORT_PNG)
            except ImportError as e:
                echo(f"warning: no plot ({e}); install matplotlib for {REPORT_PNG}")
        (stage / LAYER_TABLE).write_text(merge_report.layer_table(loaded.num_classes, image_size))
        if torch_out is not None:
            interop.save_torch_checkpoint(merged, TERNARY, outputs[Path(torch_out)])
        if model_io.is_model_checkpoint(out):
            shutil.rmtree(out)  # replaced as a whole: no stale report or plot from an earlier merge
        for final, staged in outputs.items():
            os.replace(staged, final)
    finally:
        for staged in outputs.values():
            if staged.is_dir():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                staged.unlink(missing_ok=True)
    plot_path = plot_path and out / REPORT_PNG
    echo(merge_report.format_report(rep))
    if packed is not None:
        echo(f"wrote {packed} (packed 2-bit ternary model)")
    echo(f"wrote {out} ({TERNARY} model checkpoint, {REPORT_JSON}"
         f"{', ' + REPORT_PNG if plot_path else ''}, {LAYER_TABLE})")
    if torch_out is not None:
        echo(f"wrote {torch_out} (the original's resnet18_ter format: {{'state_dict'}} with "
             "'module.' keys)")
    return MergeResult(out, torch_out and Path(torch_out), check, rep, loaded, plot_path)
