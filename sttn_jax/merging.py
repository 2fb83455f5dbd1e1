"""bwx2 -> ternary: each binary pair becomes one ternary convolution (the original
`merge_from_bwx2_to_ternary.py`): weight = B1 + B2 = alpha (sign W1 + sign W2), bias = b1 + b2;
every other tensor (stem, BatchNorm, PReLU, fc) is copied.

- `merge_params(params)` / `merge_variables(variables)`: the merge itself.
- `check_merge(bwx2_variables, ternary_variables, ...)`: both models on one batch of random
  normal images, float32, eval mode; the merge is accepted when max|delta logit| /
  max|bwx2 logit| <= 1e-5.
- `merge_checkpoint(source, out, ...)`: what `merge.py` does: load a bwx2 model from a training
  workdir, a model checkpoint or an original .pth.tar, merge, check, and only then write the
  resnet18_ter model checkpoint, its report (`sttn_jax.report`) and optionally the original's
  PyTorch format.

Exactness: the merged kernel is computed by the same jitted `ops.fold_binary_pair` the bwx2
model runs in its forward pass, so it is bit-identical to the kernel the bwx2 model convolves
with, and the two models give bit-identical logits (measured on CPU: 0.0 difference at 32x32
and 224x224). An eagerly computed kernel differs in the last bit of some alphas (another
summation order), which moves the logits by ~2e-7 relative and can flip a ternary activation
sitting at +-0.5.
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ops import fold_binary_pair
from sttn_jax.checkpoints import CheckpointError

MERGE_TOLERANCE = 1e-5        # max|delta logit| / max|bwx2 logit|, float32
DEFAULT_CHECK_BATCH = 8
DEFAULT_IMAGE_SIZE = 224
BWX2, TERNARY = "resnet18_bwx2", "resnet18_ter"
REPORT_JSON = "merge_report.json"
REPORT_PNG = "merge_report.png"


class MergeCheckError(CheckpointError):
    """The merged model's logits differ from the bwx2 model's beyond the tolerance: nothing is
    written."""


def _is_pair(node) -> bool:
    return isinstance(node, dict) and {"kernel_1", "kernel_2", "bias_1", "bias_2"} <= set(node)


@jax.jit
def _fold_clamped(w1, w2):
    """The ternary kernel of one pair, as the bwx2 forward computes it (jitted: same rounding)."""
    return fold_binary_pair(jnp.clip(w1, -1, 1), jnp.clip(w2, -1, 1))


def merge_params(params):
    """Ternary-model params from bwx2 params. The latent kernels are clamped to [-1, 1] first, as
    the original does before every binarization (a no-op for its saved checkpoints)."""
    if _is_pair(params):
        kernel = _fold_clamped(jnp.asarray(params["kernel_1"]), jnp.asarray(params["kernel_2"]))
        bias = np.asarray(params["bias_1"]) + np.asarray(params["bias_2"])
        return {"kernel": np.asarray(kernel), "bias": np.asarray(bias)}
    if isinstance(params, dict):
        return {k: merge_params(v) for k, v in params.items()}
    return params


def merge_variables(variables):
    """{"params", "batch_stats"} of a resnet18_ter model from those of a resnet18_bwx2 model."""
    if not any(True for _ in _pairs(variables["params"])):
        raise ValueError("these variables hold no binary pairs (kernel_1/kernel_2): not a resnet18_bwx2 model")
    return {"params": merge_params(variables["params"]), "batch_stats": variables.get("batch_stats", {})}


def _pairs(tree, prefix=""):
    if _is_pair(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _pairs(v, f"{prefix}/{k}" if prefix else k)


def binary_pairs(params) -> list[tuple[str, dict]]:
    """[(flax module path such as 'features_4/conv1', {'kernel_1', 'kernel_2', 'bias_1',
    'bias_2'})] of a bwx2 parameter tree, in the network's order."""
    return list(_pairs(params))


# ---------------------------------------------------------------------------------------------
# the check


@dataclasses.dataclass
class MergeCheck:
    """bwx2 vs merged logits on one batch of random normal images (float32, eval mode)."""
    batch: int
    image_size: int
    seed: int
    max_abs_diff: float
    max_abs_bwx2: float
    relative: float
    top1_agree: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.relative) and self.relative <= self.tolerance)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed, "dtype": "float32",
                "images": "standard normal, NHWC"}

    def format(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"merge check: resnet18_bwx2 vs merged resnet18_ter, {self.batch} random normal "
                f"images {self.image_size}x{self.image_size} (seed {self.seed}), float32\n"
                f"  max|dlogit| {self.max_abs_diff:.3e}  max|bwx2 logit| {self.max_abs_bwx2:.3e}  "
                f"relative {self.relative:.3e} (tolerance {self.tolerance:g})  top-1 agreement "
                f"{self.top1_agree}/{self.batch}: {verdict}")


@functools.lru_cache(maxsize=None)
def _apply_fn(arch: str, num_classes: int, act_backend: str):
    from sttn_jax import models

    module = models.create(arch, num_classes=num_classes, dtype=jnp.float32, act_backend=act_backend)
    return jax.jit(lambda v, x: module.apply(v, x, train=False))


def check_images(batch: int = DEFAULT_CHECK_BATCH, image_size: int = DEFAULT_IMAGE_SIZE,
                 seed: int = 0) -> np.ndarray:
    """The check's batch: standard normal float32 images, NHWC."""
    if batch < 1 or image_size < 32:
        raise CheckpointError(f"the merge check needs a batch >= 1 and images of at least 32x32, "
                              f"got batch {batch} at {image_size}x{image_size}")
    return np.random.default_rng(seed).standard_normal((batch, image_size, image_size, 3),
                                                       dtype=np.float32)


def check_merge(bwx2_variables, ternary_variables, *, batch: int = DEFAULT_CHECK_BATCH,
                image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                tolerance: float = MERGE_TOLERANCE, act_backend: str = "auto") -> MergeCheck:
    """Runs both models (eval mode, float32; the bwx2 latent kernels clamped as the original's
    validate() does) on `batch` random normal images and compares the logits:
    relative = max|delta| / max|bwx2 logits|."""
    import ops

    images = check_images(batch, image_size, seed)
    num_classes = int(np.shape(bwx2_variables["params"]["fc"]["kernel"])[-1])
    bw = {"params": ops.clamp_latent_kernels(bwx2_variables["params"]),
          "batch_stats": bwx2_variables.get("batch_stats", {})}
    a = np.asarray(_apply_fn(BWX2, num_classes, act_backend)(bw, images), np.float64)
    b = np.asarray(_apply_fn(TERNARY, num_classes, act_backend)(ternary_variables, images),
                   np.float64)
    diff = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(a)))
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        rel = float("inf")
    else:
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    agree = int(np.sum(np.argmax(a, -1) == np.argmax(b, -1)))
    return MergeCheck(batch, image_size, seed, diff, scale, rel, agree, tolerance)


# ---------------------------------------------------------------------------------------------
# merge.py


@dataclasses.dataclass
class MergeResult:
    out: Path
    torch_out: Path | None
    check: MergeCheck
    report: dict
    source: object  # sttn_jax.model_sources.LoadedModel
    plot: Path | None


def _check_destination(out: Path, source_path: Path) -> None:
    from sttn_jax import checkpoints

    if out == source_path or out in source_path.parents:
        raise CheckpointError(f"--out {out} would overwrite the source {source_path}; pick a new "
                              "directory")
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"--out {out} is a file; give a directory for the model checkpoint")
        if any(out.iterdir()) and not checkpoints.is_model_checkpoint(out):
            raise CheckpointError(f"--out {out} exists and is not a model checkpoint; pick a new "
                                  "directory (an existing model checkpoint is replaced)")


def merge_checkpoint(source, out, *, torch_out=None, step: int | None = None,
                     batch: int = DEFAULT_CHECK_BATCH, image_size: int | None = None,
                     seed: int = 0, tolerance: float = MERGE_TOLERANCE, plot: bool = True,
                     echo: Callable[[str], None] = print) -> MergeResult:
    """Loads the resnet18_bwx2 model at `source` (training workdir: best checkpoint, or `step`;
    model checkpoint; original .pth.tar), merges it, checks the logits, and only if the check
    passes writes `out` (a resnet18_ter model checkpoint with merge_report.json and
    merge_report.png) and, with `torch_out`, the original's PyTorch format.

    image_size: of the check batch and of the report's MACs; None = the workdir's training
    image size, else 224. Raises MergeCheckError (writing nothing) when the logits differ by
    more than `tolerance` relative, CheckpointError for sources that are not bwx2 models."""
    from sttn_jax import checkpoints, model_sources, report

    loaded = model_sources.load(source, step=step)
    if loaded.arch != BWX2:
        what = {"resnet18_ter": "an already merged ternary model",
                "resnet50": "the ResNet-50 teacher"}.get(loaded.arch, loaded.arch)
        raise CheckpointError(f"{loaded.path}: holds a {loaded.arch} model ({what}), not "
                              f"{BWX2}; merge.py merges the binary pairs of a {BWX2} checkpoint")
    out = Path(out).absolute()
    _check_destination(out, Path(loaded.path))
    if torch_out is not None:
        torch_out = Path(torch_out).absolute()
        if torch_out.is_dir():
            raise CheckpointError(f"--torch-out {torch_out} is a directory; give a file name such "
                                  "as model_ter.pth.tar")
    if image_size is None:
        image_size = loaded.image_size or DEFAULT_IMAGE_SIZE
    echo(f"loaded {loaded.describe()}")

    merged = merge_variables(loaded.variables)
    check = check_merge(loaded.variables, merged, batch=batch, image_size=image_size, seed=seed,
                        tolerance=tolerance)
    echo(check.format())
    if not check.passed:
        raise MergeCheckError(
            f"the merged model's logits differ from the bwx2 model's by {check.relative:.3e} "
            f"relative (max|dlogit| {check.max_abs_diff:.3e}), above the tolerance "
            f"{tolerance:g}: refusing to write {out}")

    rep = report.build_merge_report(loaded.variables["params"], merged, image_size=image_size,
                                    source=loaded.info(), check=check.as_dict())
    extra = {"merged_from": loaded.info(), "merge_check": check.as_dict(),
             "num_classes": loaded.num_classes, "report": REPORT_JSON}
    if out.exists() and checkpoints.is_model_checkpoint(out):
        shutil.rmtree(out)  # replaced as a whole: no stale report or plot from an earlier merge
    checkpoints.save_model(out, merged, TERNARY, extra=extra)
    report.save_json(rep, out / REPORT_JSON)
    plot_path = None
    if plot:
        try:
            plot_path = report.save_plot(rep, out / REPORT_PNG)
        except ImportError as e:
            echo(f"warning: no plot ({e}); install matplotlib for {REPORT_PNG}")
    echo(report.format_report(rep))
    echo(f"wrote {out} ({TERNARY} model checkpoint, {REPORT_JSON}"
         f"{', ' + REPORT_PNG if plot_path else ''})")
    if torch_out is not None:
        from sttn_jax import interop

        interop.save_torch_checkpoint(merged, TERNARY, torch_out)
        echo(f"wrote {torch_out} (the original's resnet18_ter format: {{'state_dict'}} with "
             "'module.' keys)")
    return MergeResult(out, torch_out, check, rep, loaded, plot_path)
