"""Times sttn-jax on one device and writes the numbers as JSON.

    python benchmarks/run.py                      # batch 256, 224x224, 20 timed steps, backend auto
    python benchmarks/run.py --smoke              # tiny sizes: checks the script runs (CPU tests)
    python benchmarks/run.py --only act,copy      # a subset of train, eval, stem, act, copy, input
    python benchmarks/run.py --only input         # the host input pipeline, images/s per CPU core
    python benchmarks/run.py --compare-backends   # also training and inference, triton vs xla
    python benchmarks/run.py --compare-stems      # also bf16 training and inference per stem form
    python benchmarks/run.py --compare-teacher-bn # also bf16 training, the teacher's BatchNorm on
                                                  # its running statistics (the table ends in "wins" lines)
    python benchmarks/run.py --only train --remat on  # the training step recomputing in backward

Measurements (synthetic data already on the device, `jax.block_until_ready` after each sample,
median of --steps samples after --warmup untimed ones, each program compiled before timing):
- train: one `sttn_jax.training.make_train_step` step (resnet18_bwx2 student, train-mode ResNet-50
  teacher from random weights, distillation loss, Adam), float32 and bfloat16 compute, images/s;
  the peak device memory of each step where the backend reports it (GPU; None on CPU); with
  --remat (default: the config's, "off").
- eval: resnet18_ter inference (`module.apply(..., train=False)`; the student's random variables
  merged by `sttn_jax.merging`), float32, bfloat16, and int8 (`inference_dtype="int8"`: int8
  activations and kernels, int32 sums) with float32 (int8) and bfloat16 (int8_bf16) float parts
  (stem, BatchNorm, PReLU, fc), images/s.
- stem: the 7x7 stem convolution's forward and kernel gradient (what a training step runs of it)
  on the batch, float32 and bfloat16, milliseconds: with the images' 3 channels, as the models
  run it; zero-padded to 4 and 8 channels; and the other forms the models can take
  (`config.stem_conv`, `convolutions.CONV_FORMS`): a 4x4 stride-1 convolution over 2x2 space-to-depth
  blocks of 12 channels, and one matrix product over the 49 shifted windows ("im2col": 147-long
  rows instead of 3-channel convolution kernels). All compute the same sums; they ask whether the
  GPU has faster kernels for the other shapes (padding: not on an H200). --compare-stems then
  times the bfloat16 training step and inference with each form in the models.
- act: `ops.ternary_activation`, the Triton kernel where it runs (else, or with --backend xla,
  XLA's), forward as training runs it (reads x, writes y and the boolean mask saved for the
  backward), backward (reads the mask and the incoming gradient, writes the gradient) and forward
  as inference runs it (reads x, writes y: the kernel without the mask), GB/s counting exactly
  those bytes, on a 256x56x56x64 tensor (the first stage's size).
- copy: `x * s` with a runtime scalar s (cannot be folded away): the bandwidth the activation is
  measured against, counting bytes read + written. Each act and copy sample times 10 back-to-back
  calls (2 with --smoke), so that one sync per call does not dominate a sub-millisecond kernel;
  each train and eval sample times 5 back-to-back steps (1 with --smoke), as a training loop
  dispatches them: the host prepares the next step while the device runs this one.

- input (only with --only input; it needs TensorFlow, which the GPU machine lacks): the training
  and eval input pipelines and PIL's, images/s per CPU core (`benchmarks/input_bench.py`).

Everything runs on `jax.devices()[0]`. Nothing else here imports TensorFlow.
Writes benchmarks/results/<date>_<device-kind-slug>.json (or --output) and prints a table. A failed
measurement is recorded under "errors" and the run goes on; the exit status is then 1. The JSON is
rewritten after every measurement ("complete": false until the end), so a run cut short keeps its
numbers.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/run.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ops  # noqa: E402
from configs import default as default_config  # noqa: E402
from ops import ternary as ternary_mod  # noqa: E402
from sttn_jax import archs, convolutions, merging, models, quantize, training  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECTIONS = ("train", "eval", "stem", "act", "copy", "input")
DEFAULT_SECTIONS = SECTIONS[:5]
# input channels, or one of the models' other forms (`stem_conv`)
STEM_VARIANTS = ("3", "4", "8") + tuple(form for form in convolutions.CONV_FORMS if form != "conv")
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# inference modes: (dtype of the float parts, inference_dtype)
EVAL_MODES = {"fp32": (jnp.float32, None), "bf16": (jnp.bfloat16, None),
              "int8": (jnp.float32, "int8"), "int8_bf16": (jnp.bfloat16, "int8")}
CONFIG_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
STUDENT, TEACHER, EVAL_ARCH = "resnet18_bwx2", "resnet50", "resnet18_ter"
NUM_CLASSES = 1000
FULL = {"batch": 256, "image_size": 224, "steps": 20, "warmup": 5, "act_shape": (256, 56, 56, 64),
        "calls_per_sample": 10, "steps_per_sample": 5}
SMOKE = {"batch": 8, "image_size": 32, "steps": 2, "warmup": 1, "act_shape": (8, 16, 16, 8),
         "calls_per_sample": 2, "steps_per_sample": 1}
RESULT_KEYS = ("train_fp32_img_s", "train_bf16_img_s", "eval_fp32_img_s", "eval_bf16_img_s",
               "eval_int8_img_s", "eval_int8_bf16_img_s", "act_fwd_gbps_fp32", "act_fwd_gbps_bf16",
               "act_bwd_gbps_fp32", "act_bwd_gbps_bf16", "act_infer_gbps_fp32",
               "act_infer_gbps_bf16", "copy_gbps_fp32", "copy_gbps_bf16",
               "train_fp32_peak_gib", "train_bf16_peak_gib")
# The activation's timed forms: training's forward (with the mask), its backward, inference's
ACT_WAYS = ("fwd", "bwd", "infer")
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (batch 8, 32x32, 2 timed steps, activation 8x16x16x8)")
    p.add_argument("--batch", type=int, help="global batch of the train and eval steps (256)")
    p.add_argument("--image-size", type=int, help="square image side (224)")
    p.add_argument("--steps", type=int, help="timed samples per measurement; the median is kept (20)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (5)")
    p.add_argument("--backend", default="auto", choices=ternary_mod.BACKENDS,
                   help="ternary activation backend for every measurement (auto)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (all but input)")
    p.add_argument("--compare-backends", action="store_true",
                   help="also time the training step and inference with act_backend triton and "
                        "xla (fp32 and bf16)")
    p.add_argument("--compare-stems", action="store_true",
                   help="also time the bf16 training step and inference (where those sections run) "
                        "with every stem_conv form")
    p.add_argument("--compare-teacher-bn", action="store_true",
                   help="also time the bf16 training step with the teacher's BatchNorm on its "
                        "running statistics (config.teacher_bn_train_mode=False)")
    p.add_argument("--stem-conv", choices=tuple(convolutions.CONV_FORMS),
                   default=default_config.get_config().stem_conv,
                   help="config.stem_conv of the training and inference steps (default: the "
                        "config's)")
    p.add_argument("--remat", choices=("on", "off", "auto"),
                   default=default_config.get_config().remat,
                   help="config.remat of the training steps (default: the config's)")
    p.add_argument("--output", help="JSON path (default benchmarks/results/<date>_<device>.json)")
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    for key in ("batch", "image_size", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.act_shape = base["act_shape"]
    args.calls_per_sample = base["calls_per_sample"]
    args.steps_per_sample = base["steps_per_sample"]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown or not only:
        p.error(f"--only takes a comma-separated subset of {','.join(SECTIONS)}, got {args.only!r}")
    args.only = [s for s in SECTIONS if s in only]
    if args.steps < 1 or args.warmup < 0 or args.batch < 2:
        p.error("need --steps >= 1, --warmup >= 0 and --batch >= 2 (BatchNorm in training)")
    if problem := archs.image_size_problem(args.image_size):
        p.error(f"--image-size {args.image_size}: {problem}")
    if args.backend == "triton" and ternary_mod.triton_unavailable_reason():
        p.error(ternary_mod.triton_unavailable_reason())
    return args


# -- timing -----------------------------------------------------------------------------------
def median_seconds(call, steps: int, warmup: int, calls_per_sample: int = 1) -> float:
    """Median wall time of one `call()` over `steps` samples, after `warmup` untimed calls. Each
    sample runs `calls_per_sample` calls back to back and blocks once on the last result."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(calls_per_sample):
            out = call()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls_per_sample)
    return statistics.median(samples)


def compile_timed(jitted, *args):
    """(compiled executable, compile seconds, temp bytes XLA planned or None)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # not every backend reports it
        temp = None
    return compiled, seconds, temp


def peak_bytes(device):
    """The device's peak bytes in use so far (GPU/TPU), or None where the backend has no stats."""
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return stats.get("peak_bytes_in_use") if stats else None


# -- measurements -----------------------------------------------------------------------------
def train_config(dtype: str, backend: str, batch: int, image_size: int, remat: str,
                 stem_conv: str = "conv", teacher_bn_train_mode: bool = True):
    """The measured training step's config: STUDENT distilled from TEACHER, whose BatchNorm runs
    in training mode as the original's (teacher_bn_train_mode=False: the option that uses its
    running statistics)."""
    config = default_config.get_config()
    config.arch, config.teacher_arch, config.num_classes = STUDENT, TEACHER, NUM_CLASSES
    config.dtype, config.act_backend = CONFIG_DTYPE[dtype], backend
    config.batch_size, config.image_size = batch, image_size
    config.teacher_bn_train_mode = teacher_bn_train_mode
    config.remat, config.stem_conv = remat, stem_conv
    return config


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = jax.devices()[0]
        self.mesh = training.make_mesh([self.device])
        self.details: dict = {}  # name -> median ms, compile s, bytes, ...
        self._student = self._teacher = self._ternary = None
        rng = np.random.default_rng(0)
        self.images = rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
        self.labels = (np.arange(args.batch) % NUM_CLASSES).astype(np.int32)

    # Random-weight variables, created once and shared by the fp32 and bf16 runs (parameters are
    # float32 in both; only the computation dtype differs).
    def student_variables(self):
        if self._student is None:
            self._student = models.init_variables(models.create(STUDENT, NUM_CLASSES),
                                                  jax.random.PRNGKey(0))
        return self._student

    def teacher_variables(self):
        if self._teacher is None:
            self._teacher = models.init_variables(models.create(TEACHER, NUM_CLASSES),
                                                  jax.random.PRNGKey(1))
        return self._teacher

    def ternary_variables(self):
        """The student's variables merged into resnet18_ter's (the workflow, and no second init)."""
        if self._ternary is None:
            self._ternary = merging.merge_variables(self.student_variables())
        return self._ternary

    def train_program(self, dtype: str, backend: str, stem_conv: str | None = None,
                      teacher_bn_train_mode: bool = True):
        """(call, compiled, compile seconds, planned temp bytes) of the full training step; each
        `call()` runs one step on the same batch, the state carried along. stem_conv: default
        --stem-conv."""
        a = self.args
        config = train_config(dtype, backend, a.batch, a.image_size, a.remat,
                              stem_conv or a.stem_conv, teacher_bn_train_mode)
        tx = training.create_optimizer(config, training.learning_rate_fn(config, 1000))
        state = training.create_train_state(config, self.mesh, tx,
                                            variables=self.student_variables())
        batch = training.shard_batch(self.mesh, {"image": self.images, "label": self.labels})
        train_step = training.make_train_step(config, self.mesh, tx, self.teacher_variables())
        teacher = train_step.teacher_variables
        step, compile_s, temp = compile_timed(train_step.jitted, state, batch, teacher)
        holder = {"state": state}
        del state

        def call():
            holder["state"], metrics = step(holder["state"], batch, teacher)
            return holder["state"], metrics

        call.remat = training.use_remat(config)
        return call, step, compile_s, temp

    def train(self, dtype: str, backend: str, name: str, stem_conv: str | None = None,
              teacher_bn_train_mode: bool = True) -> float:
        """Images/s of the full training step."""
        a = self.args
        call, _, compile_s, temp = self.train_program(dtype, backend, stem_conv,
                                                      teacher_bn_train_mode)
        seconds = median_seconds(call, a.steps, a.warmup, a.steps_per_sample)
        loss = float(call()[1]["loss"])
        self.details[name] = {"median_ms": seconds * 1e3, "compile_s": compile_s,
                              "compiled_temp_gib": None if temp is None else temp / GIB,
                              "final_loss": loss, "act_backend": backend,
                              "remat": call.remat, "stem_conv": stem_conv or a.stem_conv,
                              "teacher_bn_train_mode": teacher_bn_train_mode}
        return a.batch / seconds

    def inference_program(self, mode: str, backend: str, stem_conv: str | None = None):
        """(call, compiled, compile seconds) of resnet18_ter inference (mode: EVAL_MODES;
        stem_conv: default --stem-conv)."""
        dtype, inference_dtype = EVAL_MODES[mode]
        module = models.create(EVAL_ARCH, NUM_CLASSES, dtype, backend,
                               inference_dtype=inference_dtype,
                               stem_conv=stem_conv or self.args.stem_conv)
        variables = self.ternary_variables()
        if inference_dtype == "int8":
            variables = quantize.int8_variables(jax.device_get(variables))
        variables = jax.device_put(variables, self.device)
        images = jax.device_put(self.images, self.device)
        fn, compile_s, _ = compile_timed(jax.jit(lambda v, x: module.apply(v, x, train=False)),
                                         variables, images)
        return (lambda: fn(variables, images)), fn, compile_s

    def inference(self, mode: str, backend: str, name: str, stem_conv: str | None = None) -> float:
        """Images/s of resnet18_ter inference (mode: EVAL_MODES)."""
        a = self.args
        call, _, compile_s = self.inference_program(mode, backend, stem_conv)
        seconds = median_seconds(call, a.steps, a.warmup, a.steps_per_sample)
        self.details[name] = {"median_ms": seconds * 1e3, "compile_s": compile_s,
                              "stem_conv": stem_conv or a.stem_conv}
        return a.batch / seconds

    def stem(self, dtype: str) -> dict:
        """{variant: ms} of the stem convolution's forward and kernel gradient (STEM_VARIANTS)."""
        a = self.args
        x = jax.device_put(jnp.asarray(self.images, DTYPES[dtype]), self.device)
        kernel = jax.device_put(jnp.asarray(np.random.default_rng(4).normal(
            size=(7, 7, 3, 64)) * 0.05, DTYPES[dtype]), self.device)

        def forward_and_kernel_grad(x, kernel, variant):
            y, vjp = jax.vjp(lambda k: stem_conv(variant)(x, k), kernel)
            return y, vjp(y)[0]

        out = {}
        for variant in STEM_VARIANTS:
            fn, compile_s, _ = compile_timed(
                jax.jit(forward_and_kernel_grad, static_argnums=2), x, kernel, variant)
            seconds = median_seconds(lambda: fn(x, kernel), a.steps, a.warmup, a.calls_per_sample)
            out[variant] = seconds * 1e3
            self.details[f"stem_{dtype}_{variant}"] = {"median_ms": seconds * 1e3,
                                                       "compile_s": compile_s}
        return out

    def _tensor(self, dtype: str):
        x = np.random.default_rng(3).normal(size=self.args.act_shape).astype(np.float32)
        return jax.device_put(jnp.asarray(x, DTYPES[dtype]), self.device)

    def activation(self, dtype: str) -> tuple[float, float, float]:
        """GB/s of the ternary activation's training forward, its backward and its inference
        forward: the Triton kernels where they can run (what the bandwidth target is about)
        unless --backend xla."""
        a = self.args
        xla = a.backend == "xla" or ternary_mod.triton_unavailable_reason()
        backend = "xla" if xla else "triton"
        x = self._tensor(dtype)
        fwd, fwd_compile, _ = compile_timed(
            jax.jit(lambda x: jax.vjp(lambda t: ops.ternary_activation(t, backend), x)), x)
        y, vjp_fn = fwd(x)
        saved = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp_fn))  # the boolean mask
        fwd_bytes = x.nbytes + y.nbytes + saved
        fwd_s = median_seconds(lambda: fwd(x), a.steps, a.warmup, a.calls_per_sample)
        g = self._tensor(dtype)
        bwd, bwd_compile, _ = compile_timed(jax.jit(lambda f, g: f(g)[0]), vjp_fn, g)
        bwd_bytes = saved + g.nbytes + x.nbytes
        bwd_s = median_seconds(lambda: bwd(vjp_fn, g), a.steps, a.warmup, a.calls_per_sample)
        infer, infer_compile, _ = compile_timed(
            jax.jit(lambda x: ops.ternary_activation(x, backend)), x)
        infer_bytes = x.nbytes + y.nbytes
        infer_s = median_seconds(lambda: infer(x), a.steps, a.warmup, a.calls_per_sample)
        resolved = ternary_mod.resolve_backend(backend, x.dtype)
        for way, ms, nbytes, compile_s in (("fwd", fwd_s, fwd_bytes, fwd_compile),
                                           ("bwd", bwd_s, bwd_bytes, bwd_compile),
                                           ("infer", infer_s, infer_bytes, infer_compile)):
            self.details[f"act_{way}_{dtype}"] = {"median_ms": ms * 1e3, "bytes": nbytes,
                                                  "compile_s": compile_s, "backend": resolved}
        return fwd_bytes / fwd_s / 1e9, bwd_bytes / bwd_s / 1e9, infer_bytes / infer_s / 1e9

    def copy(self, dtype: str) -> float:
        """GB/s of an elementwise pass over the same tensor (read + write)."""
        a = self.args
        x = self._tensor(dtype)
        s = jax.device_put(jnp.ones((), x.dtype), self.device)
        fn, compile_s, _ = compile_timed(jax.jit(lambda x, s: x * s), x, s)
        seconds = median_seconds(lambda: fn(x, s), a.steps, a.warmup, a.calls_per_sample)
        nbytes = 2 * x.nbytes
        self.details[f"copy_{dtype}"] = {"median_ms": seconds * 1e3, "bytes": nbytes,
                                         "compile_s": compile_s}
        return nbytes / seconds / 1e9


def stem_conv(variant: str):
    """The stem convolution (7x7, stride 2, padding 3) of STEM_VARIANTS: `conv(x, kernel)`."""
    if variant in convolutions.CONV_FORMS:
        return lambda x, kernel: convolutions.CONV_FORMS[variant](x, kernel, 2, 3)
    return lambda x, kernel: stem_conv_padded(x, kernel, int(variant))


def stem_conv_padded(x, kernel, channels: int):
    """The stem convolution (7x7, stride 2, padding 3) with zero input channels added up to
    `channels` in image and kernel: the same sums."""
    extra = channels - x.shape[-1]
    x = jnp.pad(x, ((0, 0),) * 3 + ((0, extra),))
    kernel = jnp.pad(kernel, ((0, 0),) * 2 + ((0, extra), (0, 0)))
    return convolutions.conv2d(x, kernel, 2, 3)


def resolved_backends(backend: str) -> dict:
    out = {}
    for dtype, jdt in DTYPES.items():
        try:
            out[dtype] = ternary_mod.resolve_backend(backend, jdt)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            out[dtype] = f"unavailable: {e}"
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "optax", "triton", "jax-triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def run(args, save=lambda result: None) -> dict:
    """All measurements; `save(result)` is called after each, so a run cut short keeps its numbers."""
    device = jax.devices()[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "device": {"kind": device.device_kind, "platform": device.platform,
                   "device_count": jax.device_count(), "devices_used": 1},
        **{key: None for key in RESULT_KEYS},
        "batch": args.batch, "image_size": args.image_size, "steps": args.steps,
        "warmup": args.warmup, "backend": args.backend,
        "remat": args.remat, "stem_conv": args.stem_conv,
        "backend_resolved": resolved_backends(args.backend),
        "act_shape": list(args.act_shape), "calls_per_sample": args.calls_per_sample,
        "steps_per_sample": args.steps_per_sample,
        "smoke": args.smoke, "only": args.only, "models": {"student": STUDENT, "teacher": TEACHER,
                                                           "eval": EVAL_ARCH},
        "jax_version": jax.__version__, "versions": versions(),
        "date": now.strftime("%Y-%m-%d"), "timestamp": now.isoformat(timespec="seconds"),
        "errors": {},
    }
    bench = Bench(args)
    errors = result["errors"]

    def measure(name, fn, *keys):
        """Runs one measurement; stores its value(s) under `keys`; records an error instead of
        raising; saves the JSON so far."""
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            value = fn()
            result.update(zip(keys, value if len(keys) > 1 else (value,)))
            return value
        except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"[:2000]
            return None
        finally:
            save(dict(result, details=bench.details, complete=False))

    def train(dtype):
        # The device's peak memory is a high-water mark for the whole process: bfloat16 (the
        # smaller step) runs first, so each reading is that step's peak (teacher, state and batch
        # included).
        speed = bench.train(dtype, args.backend, f"train_{dtype}")
        peak = peak_bytes(device)
        return speed, None if peak is None else peak / GIB

    if "train" in args.only:
        for dtype in ("bf16", "fp32"):
            measure(f"train_{dtype}", lambda d=dtype: train(d), f"train_{dtype}_img_s",
                    f"train_{dtype}_peak_gib")
    if "eval" in args.only:
        for mode in EVAL_MODES:
            measure(f"eval_{mode}", lambda m=mode: bench.inference(m, args.backend, f"eval_{m}"),
                    f"eval_{mode}_img_s")
    if args.compare_backends:  # right after the main runs: the "within 3 %" target, and "auto"
        result["compare_backends"] = {}
        compare_backends(bench, result, measure, result["compare_backends"])
    if args.compare_stems:
        result["compare_stems"] = {}
        compare_stems(bench, result, measure, result["compare_stems"])
    if args.compare_teacher_bn and "train" in args.only:
        result["compare_teacher_bn"] = {}
        compare_teacher_bn(bench, result, measure, result["compare_teacher_bn"])
    if "stem" in args.only:
        result["stem_ms"] = {}
        for dtype in DTYPES:
            measure(f"stem_{dtype}", lambda d=dtype: result["stem_ms"].setdefault(d, bench.stem(d)))
    if "act" in args.only:
        for dtype in DTYPES:
            measure(f"act_{dtype}", lambda d=dtype: bench.activation(d),
                    *(f"act_{way}_gbps_{dtype}" for way in ACT_WAYS))
    if "copy" in args.only:
        for dtype in DTYPES:
            measure(f"copy_{dtype}", lambda d=dtype: bench.copy(d), f"copy_gbps_{dtype}")
    if "input" in args.only:
        def input_rates():
            import input_bench  # benchmarks/: it imports TensorFlow, which only this section needs

            rates = input_bench.measure(num_images=16 if args.smoke else 64,
                                        seconds=0.5 if args.smoke else 4.0)
            result.update(rates)
            return rates["input_img_s_per_core"]

        measure("input", input_rates, "input_img_s_per_core")
    result["details"] = bench.details
    result["complete"] = True
    return result


def compare_backends(bench, result, measure, out: dict) -> None:
    """Fills `out` with the images/s of the training step (and of inference, when the eval section
    ran) with the Triton and with the XLA activation, per dtype. A main-run measurement whose
    backend resolved to the same one is reused."""
    reason = ternary_mod.triton_unavailable_reason()
    out["triton_unavailable"] = reason
    kinds = ["train"] + (["eval"] if "eval" in bench.args.only else [])
    for kind in kinds:
        for dtype in DTYPES:
            key = f"{kind}_{dtype}_img_s"
            row = out[key] = {"triton": None, "xla": None, "triton_over_xla": None}
            for backend in ("triton", "xla"):
                if backend == "triton" and reason:
                    continue
                main = result.get(key)
                if main is not None and result["backend_resolved"][dtype] == backend:
                    row[backend] = main
                    continue
                name = f"{kind}_{dtype}_{backend}"
                timed = bench.train if kind == "train" else bench.inference
                row[backend] = measure(name, lambda t=timed, d=dtype, b=backend, n=name: t(d, b, n))
            if row["triton"] and row["xla"]:
                row["triton_over_xla"] = row["triton"] / row["xla"]


def compare_stems(bench, result, measure, out: dict) -> None:
    """Fills `out` with {key: {stem form: images/s}} of the bfloat16 training step and inference
    (those of the train and eval sections that ran), the main runs' form reused."""
    a = bench.args
    for kind in ("train", "eval"):
        if kind not in a.only:
            continue
        key = f"{kind}_bf16_img_s"
        row = out[key] = {a.stem_conv: result.get(key)}
        timed = bench.train if kind == "train" else bench.inference
        for form in convolutions.CONV_FORMS:
            if form != a.stem_conv:
                name = f"{kind}_bf16_stem_{form}"
                row[form] = measure(name, lambda n=name, f=form: timed("bf16", a.backend, n, f))


def compare_teacher_bn(bench, result, measure, out: dict) -> None:
    """Fills `out` with the images/s of the bfloat16 training step with the teacher's BatchNorm in
    training mode (the default: the main run's) and on its running statistics ("eval")."""
    key, name = "train_bf16_img_s", "train_bf16_teacher_bn_eval"
    out[key] = {"train": result.get(key), "eval": measure(name, lambda: bench.train(
        "bf16", bench.args.backend, name, teacher_bn_train_mode=False))}


def lever_rows(result: dict):
    """(row, {setting: images/s}, the default setting) of every comparison the run made."""
    for key, r in (result.get("compare_backends") or {}).items():
        if key.endswith("_img_s"):
            resolved = result["backend_resolved"][key.split("_")[1]]
            yield key + " by backend", {b: r[b] for b in ("triton", "xla")}, resolved
    for key, row in (result.get("compare_stems") or {}).items():
        yield key + " by stem", row, result["stem_conv"]
    for key, row in (result.get("compare_teacher_bn") or {}).items():
        yield key + " by teacher BN mode", row, "train"
    for floats, int8 in (("fp32", "int8"), ("bf16", "int8_bf16")):
        yield (f"eval_{floats}_img_s by inference dtype",
               {floats: result.get(f"eval_{floats}_img_s"), int8: result.get(f"eval_{int8}_img_s")},
               floats)


def winners(result: dict) -> list[str]:
    """One line per comparison: the fastest setting, and by how much it beats the default."""
    lines = []
    for label, row, default in lever_rows(result):
        timed = {k: v for k, v in row.items() if v}
        if len(timed) < 2 or default not in timed:
            continue
        best = max(timed, key=timed.get)
        gain = 100 * (timed[best] / timed[default] - 1)
        lines.append(f"wins {label}: {best}" + ("" if best == default else
                                                   f" ({gain:+.1f}% over {default})"))
    return lines


# -- report -----------------------------------------------------------------------------------
def fmt(value, digits=1):
    return "-" if value is None else f"{value:,.{digits}f}"


def table(result: dict) -> str:
    d = result["details"]
    resolved = result["backend_resolved"]
    lines = [f"sttn-jax benchmark on {result['device']['kind']} ({result['device']['platform']}), "
             f"jax {result['jax_version']}, {result['date']}",
             f"batch {result['batch']}, {result['image_size']}x{result['image_size']}, median of "
             f"{result['steps']} steps after {result['warmup']}, activation backend "
             f"{result['backend']} (fp32: {resolved['fp32']}, bf16: {resolved['bf16']}), "
             f"activation tensor {'x'.join(map(str, result['act_shape']))}, "
             f"remat {result.get('remat', 'auto')}"
             + (" [SMOKE: sizes too small to mean anything]" if result["smoke"] else ""),
             f"{'measurement':<26}{'value':>12}  {'unit':<7}{'median ms':>11}  note"]

    def row(label, key, unit, detail, note=""):
        ms = d.get(detail, {}).get("median_ms")
        lines.append(f"{label:<26}{fmt(result.get(key)):>12}  {unit:<7}{fmt(ms, 3):>11}  {note}")

    for dtype in DTYPES:
        row(f"train step {dtype}", f"train_{dtype}_img_s", "img/s", f"train_{dtype}",
            f"loss {fmt(d.get(f'train_{dtype}', {}).get('final_loss'), 3)}")
    for dtype in DTYPES:
        lines.append(f"{'train ' + dtype + ' peak memory':<26}"
                     f"{fmt(result[f'train_{dtype}_peak_gib'], 2):>12}  GiB")
    for key in ("input_img_s_per_core", "input_eval_img_s_per_core", "input_fast_img_s_per_core",
                "input_pil_img_s_per_core"):
        if result.get(key) is not None:
            lines.append(f"{key:<26}{fmt(result[key]):>12}  img/s per core")
    for mode in EVAL_MODES:
        row(f"eval {EVAL_ARCH} {mode}", f"eval_{mode}_img_s", "img/s", f"eval_{mode}")
    for dtype, times in (result.get("stem_ms") or {}).items():
        lines.append(f"{'stem conv ' + dtype + ' fwd+dW':<26}" + ", ".join(
            f"{v if v in convolutions.CONV_FORMS else v + ' channels'} {ms:.3f} ms"
            for v, ms in times.items()))
    for dtype in DTYPES:
        copy = result.get(f"copy_gbps_{dtype}")
        for way in ACT_WAYS:
            speed = result.get(f"act_{way}_gbps_{dtype}")
            note = f"{100 * speed / copy:.0f}% of copy" if speed and copy else ""
            row(f"activation {way} {dtype}", f"act_{way}_gbps_{dtype}", "GB/s",
                f"act_{way}_{dtype}", note)
        row(f"copy {dtype}", f"copy_gbps_{dtype}", "GB/s", f"copy_{dtype}")
    cmp = result.get("compare_backends")
    if cmp:
        for key, r in cmp.items():
            if not key.endswith("_img_s"):
                continue
            ratio = r["triton_over_xla"]
            label = key.removesuffix("_img_s").replace("_", " ") + " triton/xla"
            lines.append(f"{label:<26}{fmt(r['triton']):>12} / {fmt(r['xla'])} img/s"
                         + (f"  triton {100 * (ratio - 1):+.1f}%" if ratio else ""))
        if cmp["triton_unavailable"]:
            lines.append(f"triton unavailable: {cmp['triton_unavailable']}")
    for comparison, by in (("compare_stems", "stem"), ("compare_teacher_bn", "teacher BN")):
        for key, row in (result.get(comparison) or {}).items():
            label = key.removesuffix("_img_s").replace("_", " ") + " by " + by
            lines.append(f"{label:<26}" + ", ".join(f"{k} {fmt(v)}" for k, v in row.items())
                         + " img/s")
    lines += winners(result)
    for name, err in result["errors"].items():
        lines.append(f"ERROR {name}: {err.splitlines()[0][:200]}")
    return "\n".join(lines)


def output_path(args) -> Path:
    if args.output:
        return Path(args.output)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS_DIR / f"{date}_{slug(jax.devices()[0].device_kind)}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    path = output_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(result):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)

    result = run(args, save)
    save(result)
    print(table(result))
    print(f"wrote {path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
