"""Parity of the JAX models with the PyTorch reference of the original (`interop.reference`).

Both frameworks run the same weights on the same batch in evaluation mode (BatchNorm on its
running statistics) and their logits are compared: max |delta logit|, relative error
max|delta| / max|reference| and top-1 agreement, in float64 and in float32.

Parity is judged in float64 only. The network ternarizes activations at +-0.5: in float32 the two
frameworks round differently (other convolution algorithms and summation orders), and an
activation that sits within rounding of a threshold legitimately lands on the other level, which
then changes the logits by far more than the rounding. In float64 that never happens on real data,
so any difference beyond ~1e-12 is a real bug. float32 is reported for information.

resnet18_bwx2 is evaluated as the original's `validate()` does: clamp the latent weights to
[-1, 1] (the original's `BinOp.binarization()` clamps in place), binarize, run.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

FLOAT64_TOLERANCE = 1e-8
DTYPES = ("float64", "float32")


@dataclasses.dataclass
class ParityResult:
    dtype: str
    max_abs_diff: float
    max_abs_reference: float
    relative_error: float
    top1_agree: int
    batch: int

    @property
    def top1_fraction(self) -> float:
        return self.top1_agree / max(self.batch, 1)


def random_images(batch: int = 2, image_size: int = 224, seed: int = 0) -> np.ndarray:
    """A batch of standard-normal float32 images, NCHW (the torch layout)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)


def as_nchw(images) -> np.ndarray:
    """Images as NCHW: NCHW stays, NHWC (last axis 3, second axis not 3) is transposed."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (4 axes), got shape {images.shape}")
    if images.shape[1] == 3:
        return images
    if images.shape[-1] == 3:
        return images.transpose(0, 3, 1, 2)
    raise ValueError(f"expected NCHW (or NHWC) RGB images, got shape {images.shape}")


def cast_floats(tree, dtype):
    """Every floating leaf of `tree` as a numpy array of `dtype`; other leaves unchanged."""
    import jax

    def cast(a):
        a = np.asarray(a)
        return a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a

    return jax.tree_util.tree_map(cast, tree)


def jax_logits(variables, arch: str, images_nchw, dtype: str = "float64",
               act_backend: str = "auto") -> np.ndarray:
    """Eval-mode logits of the Flax model (float64 runs with jax x64 enabled for the call)."""
    import jax
    import jax.numpy as jnp

    import ops

    dtype = np.dtype(dtype)
    x = np.ascontiguousarray(as_nchw(images_nchw).transpose(0, 2, 3, 1)).astype(dtype)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
    with jax.enable_x64(dtype == np.float64):
        v = cast_floats(variables, dtype)
        if arch == "resnet18_bwx2":  # the original clamps before it binarizes, also to evaluate
            v = {**v, "params": ops.clamp_latent_kernels(v["params"])}
        out = _eval_fn(arch, num_classes, jnp.dtype(dtype).name, act_backend)(v, x)
        return np.asarray(out)


@functools.lru_cache(maxsize=None)
def _eval_fn(arch: str, num_classes: int, dtype: str, act_backend: str):
    """The jitted eval-mode apply of one model configuration (cached: compiled once per shape)."""
    import jax
    import jax.numpy as jnp

    from sttn_jax import models

    module = models.create(arch, num_classes=num_classes, dtype=jnp.dtype(dtype),
                           act_backend=act_backend)
    return jax.jit(lambda v, x: module.apply(v, x, train=False))


def torch_model(variables, arch: str, dtype: str = "float64"):
    """The reference nn.Module holding `variables` (eval mode, `dtype`) and its BinOp (or None)."""
    import torch

    from sttn_jax.interop import reference
    from sttn_jax.interop.torch_io import variables_to_state_dict

    sd = variables_to_state_dict(variables, arch, prefix="")
    num_classes = int(sd["fc.weight"].shape[0])
    model = reference.build(arch, num_classes)
    model.load_state_dict(sd)
    model = model.to(getattr(torch, np.dtype(dtype).name)).eval()
    binop = reference.BinOp(model) if arch == "resnet18_bwx2" else None
    return model, binop


def torch_logits(variables, arch: str, images_nchw, dtype: str = "float64") -> np.ndarray:
    """Eval-mode logits of the PyTorch reference, as the original's validate() computes them."""
    import torch

    from sttn_jax.interop import reference

    model, binop = torch_model(variables, arch, dtype)
    x = torch.from_numpy(np.ascontiguousarray(as_nchw(images_nchw)).astype(dtype))
    return reference.evaluate(model, x, binop).numpy()


def compare(logits, reference_logits, dtype: str = "") -> ParityResult:
    logits = np.asarray(logits, np.float64)
    ref = np.asarray(reference_logits, np.float64)
    if logits.shape != ref.shape:
        raise ValueError(f"logits of shape {logits.shape} cannot be compared with reference "
                         f"logits of shape {ref.shape}")
    diff = float(np.max(np.abs(logits - ref))) if logits.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    if not np.all(np.isfinite(logits)):
        rel = float("inf")
    agree = int(np.sum(np.argmax(logits, -1) == np.argmax(ref, -1)))
    return ParityResult(dtype, diff, scale, rel, agree, int(ref.shape[0]))


def run_parity(variables, arch: str, images_nchw, reference_logits=None, dtypes=DTYPES,
               act_backend: str = "auto") -> list[ParityResult]:
    """JAX vs the PyTorch reference (or vs `reference_logits`, then torch is not run) per dtype."""
    images_nchw = as_nchw(images_nchw)
    results = []
    for dtype in dtypes:
        ours = jax_logits(variables, arch, images_nchw, dtype, act_backend)
        ref = reference_logits if reference_logits is not None else torch_logits(
            variables, arch, images_nchw, dtype)
        results.append(compare(ours, ref, dtype))
    return results


def passed(results, tolerance: float = FLOAT64_TOLERANCE) -> bool:
    """True when every float64 result is within `tolerance` relative error."""
    f64 = [r for r in results if r.dtype == "float64"]
    return bool(f64) and all(r.relative_error <= tolerance for r in f64)


def format_report(results, arch: str, images_shape, reference: str,
                  tolerance: float = FLOAT64_TOLERANCE) -> str:
    n, _, h, w = images_shape
    lines = [f"parity {arch}: JAX vs {reference}, batch {n}, {h}x{w}",
             f"  {'dtype':8s} {'max|dlogit|':>12s} {'max|ref|':>10s} {'rel. error':>11s}  top-1 agreement"]
    for r in results:
        lines.append(f"  {r.dtype:8s} {r.max_abs_diff:12.3e} {r.max_abs_reference:10.3e} "
                     f"{r.relative_error:11.3e}  {r.top1_agree}/{r.batch}")
    f64 = [r for r in results if r.dtype == "float64"]
    if f64:
        worst = max(r.relative_error for r in f64)
        verdict = "PASS" if worst <= tolerance else "FAIL"
        lines.append(f"float64 parity: {verdict} (relative error {worst:.3e}, tolerance "
                     f"{tolerance:g})")
    if any(r.dtype == "float32" for r in results):
        lines.append("float32 is reported, not judged: rounding can flip ternary activations "
                     "sitting at +-0.5.")
    return "\n".join(lines)
