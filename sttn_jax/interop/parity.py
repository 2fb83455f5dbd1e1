"""The JAX models' eval-mode logits against the PyTorch reference's, same weights and batch, in
float64 and float32: max |delta logit|, relative error and top-1 agreement. Judged in float64 only:
in float32 an activation within rounding of +-0.5 may land on the other level in one framework.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import ops
from sttn_jax import model_trees, models

FLOAT64_TOLERANCE = 1e-8
DTYPES = ("float64", "float32")


@dataclasses.dataclass
class ParityResult:
    """Logits against reference logits (`compare`); passed: relative error within tolerance."""
    dtype: str
    max_abs_diff: float
    max_abs_reference: float
    relative_error: float
    top1_agree: int
    batch: int
    tolerance: float = FLOAT64_TOLERANCE

    @property
    def passed(self) -> bool:
        return bool(self.relative_error <= self.tolerance)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed,
                "top1_fraction": self.top1_agree / max(self.batch, 1)}

    def format(self) -> str:
        return (f"max|dlogit| {self.max_abs_diff:.3e}  max|reference| "
                f"{self.max_abs_reference:.3e}  relative {self.relative_error:.3e} (tolerance "
                f"{self.tolerance:g})  top-1 agreement {self.top1_agree}/{self.batch}: "
                f"{'PASS' if self.passed else 'FAIL'}")


def random_images(batch: int = 2, image_size: int = 224, seed: int = 0) -> np.ndarray:
    """A batch of standard-normal float32 images, NCHW (the torch layout)."""
    return np.random.default_rng(seed).standard_normal((batch, 3, image_size, image_size),
                                                       dtype=np.float32)


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
    def cast(a):
        a = np.asarray(a)
        return a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a

    return jax.tree_util.tree_map(cast, tree)


def jax_logits(variables, arch: str, images_nchw, dtype: str = "float64",
               act_backend: str = "auto") -> np.ndarray:
    """Eval-mode logits of the Flax model (float64 runs with jax x64 enabled for the call)."""
    dtype = np.dtype(dtype)
    x = np.ascontiguousarray(as_nchw(images_nchw).transpose(0, 2, 3, 1)).astype(dtype)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    num_classes = model_trees.num_classes_of(variables["params"])
    with jax.enable_x64(dtype == np.float64):
        v = cast_floats(variables, dtype)
        if arch == "resnet18_bwx2":  # the original clamps before it binarizes, also to evaluate
            v = {**v, "params": ops.clamp_latent_kernels(v["params"])}
        return np.asarray(eval_fn(arch, num_classes, jnp.dtype(dtype).name, act_backend)(v, x))


@functools.lru_cache(maxsize=None)
def eval_fn(arch: str, num_classes: int, dtype: str, act_backend: str):
    """The jitted eval-mode apply of one model configuration (cached: compiled once per shape);
    the parity and merge checks share it."""
    module = models.create(arch, num_classes=num_classes, dtype=jnp.dtype(dtype),
                           act_backend=act_backend)
    return jax.jit(lambda v, x: module.apply(v, x, train=False))


def torch_logits(variables, arch: str, images_nchw, dtype: str = "float64") -> np.ndarray:
    """Eval-mode logits of the PyTorch reference, as the original's validate() computes them."""
    import torch

    from sttn_jax.interop import reference
    from sttn_jax.interop.torch_save import variables_to_state_dict

    sd = variables_to_state_dict(variables, arch, prefix="")
    model = reference.build(arch, int(sd["fc.weight"].shape[0]))
    model.load_state_dict(sd)
    model = model.to(getattr(torch, np.dtype(dtype).name))
    binop = reference.BinOp(model) if arch == "resnet18_bwx2" else None
    x = torch.from_numpy(np.ascontiguousarray(as_nchw(images_nchw)).astype(dtype))
    return reference.evaluate(model, x, binop).numpy()


def compare(logits, reference_logits, dtype: str = "",
            tolerance: float = FLOAT64_TOLERANCE) -> ParityResult:
    logits = np.asarray(logits, np.float64)
    ref = np.asarray(reference_logits, np.float64)
    if logits.shape != ref.shape:
        raise ValueError(f"logits of shape {logits.shape} cannot be compared with reference "
                         f"logits of shape {ref.shape}")
    diff = float(np.max(np.abs(logits - ref))) if logits.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    if not (np.all(np.isfinite(logits)) and np.all(np.isfinite(ref))):
        rel = float("inf")
    agree = int(np.sum(np.argmax(logits, -1) == np.argmax(ref, -1)))
    return ParityResult(dtype, diff, scale, rel, agree, int(ref.shape[0]), tolerance)


def run_parity(variables, arch: str, images_nchw, reference_logits=None, dtypes=DTYPES,
               act_backend: str = "auto") -> list[ParityResult]:
    """JAX vs the PyTorch reference (or vs `reference_logits`, then torch is not run) per dtype."""
    images_nchw = as_nchw(images_nchw)
    return [compare(jax_logits(variables, arch, images_nchw, dtype, act_backend),
                    reference_logits if reference_logits is not None
                    else torch_logits(variables, arch, images_nchw, dtype), dtype)
            for dtype in dtypes]


def passed(results) -> bool:
    """True when every float64 result passed (float32 is reported, not judged)."""
    f64 = [r for r in results if r.dtype == "float64"]
    return bool(f64) and all(r.passed for r in f64)


def format_report(results, arch: str, images_shape, reference: str) -> str:
    n, _, h, w = images_shape
    lines = [f"parity {arch}: JAX vs {reference}, batch {n}, {h}x{w}",
             f"  {'dtype':8s} {'max|dlogit|':>12s} {'max|ref|':>10s} {'rel. error':>11s}"
             + "  top-1 agreement",
             *(f"  {r.dtype:8s} {r.max_abs_diff:12.3e} {r.max_abs_reference:10.3e} "
               f"{r.relative_error:11.3e}  {r.top1_agree}/{r.batch}" for r in results)]
    f64 = [r for r in results if r.dtype == "float64"]
    if f64:
        lines.append(f"float64 parity: {'PASS' if passed(results) else 'FAIL'} (relative error "
                     f"{max(r.relative_error for r in f64):.3e}, tolerance {f64[0].tolerance:g})")
    if any(r.dtype == "float32" for r in results):
        lines.append("float32 is reported, not judged: rounding can flip ternary activations "
                     "sitting at +-0.5.")
    return "\n".join(lines)


def as_json(results, arch: str, images_shape, reference: str) -> dict:
    """The report as a JSON-able dict (`python -m sttn_jax.interop parity --output`)."""
    return {"arch": arch, "images_shape": list(images_shape), "reference": reference,
            "passed": passed(results), "results": [r.as_dict() for r in results]}
