"""Lowers the Triton backend for an NVIDIA GPU on a machine without one, through the real jax-triton.

`python tests/cuda_lowering.py CAPABILITY...` exports (`jax.export`, platform "cuda") the ternary
activation and its gradient in each kernel dtype, and the training step (`training.make_train_step`:
shard_map over a mesh, the STTN ResNet-18's gradient, Adam) and evaluation step of
`resnet18_bwx2`, with backend "triton". jax-triton's lowering rule then compiles the kernel to PTX
exactly as it would at a launch on a GPU of that compute capability: its own argument order, type
mapping and specialization. Nothing runs; no GPU or CUDA driver is needed, only jax-triton and
JAX's CUDA plugin importable (its Triton bindings; without the CUDA PJRT runtime JAX stays on the
CPU). `make install-test` puts the two in `.venv/cuda-lowering`, apart from the test environment,
and tests/test_ops.py runs this script with that directory on its path.

Prints one JSON object: {"calls": {case: number of kernel calls}, "kernels": {case: the kernels
lowered, by name}, "ptx": {"CAP/KERNEL/DTYPE": PTX}, "activation_size": the number of elements the
activation's PTX was compiled for}.
"""
import atexit
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import zlib

DUMP = tempfile.mkdtemp(prefix="jax-triton-dump-")
atexit.register(shutil.rmtree, DUMP, ignore_errors=True)
os.environ["JAX_TRITON_DUMP_DIR"] = DUMP  # read when jax_triton is imported: PTX lands here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import triton  # noqa: E402

from configs import default  # noqa: E402
from ops import kernels, ternary  # noqa: E402
from sttn_jax import training  # noqa: E402

# The kernel call is a custom call without export's compatibility guarantee: allowed here, where
# the exported module is only inspected. (jax-triton 0.3 names it triton_kernel_call, 0.4
# triton_kernel_call_ffi; CALL counts both.)
CHECKS = [jax.export.DisabledSafetyCheck.custom_call(name)
          for name in ("triton_kernel_call", "triton_kernel_call_ffi")]
CALL = "stablehlo.custom_call @triton_kernel_call"
ACTIVATION_SHAPE = (8, 56, 56, 64)  # a ResNet-18 stage-1 activation at batch 8


# The kernel a custom call runs: jax-triton puts its compiled kernel (name, PTX) into the call's
# payload, zlib-compressed (jaxlib's runtime reads it there): `backend_config` in 0.3, the `opaque`
# attribute in 0.4. MLIR prints its bytes with \\ for a backslash and \XX for the unprintable.
PAYLOAD = re.compile(r'(?:backend_config|opaque) = "(x\\9C(?:[^"\\]|\\\\|\\[0-9A-F]{2})*)"')
# the kernels ops.kernels launches (its @triton.jit helpers, named _*, are inlined into them)
KERNELS = [name for name, fn in vars(kernels).items()
           if isinstance(fn, triton.JITFunction) and not name.startswith("_")]


def _payload(escaped: str) -> bytes:
    raw = re.sub(r"\\(\\|[0-9A-F]{2})", lambda m: "\\" if m[1] == "\\" else chr(int(m[1], 16)),
                 escaped)
    return zlib.decompress(raw.encode("latin-1"))


def lowered_kernels(module: str) -> list[str]:
    """The names of the Triton kernels the custom calls of an exported `module` (text) run."""
    payloads = [_payload(m[1]) for m in PAYLOAD.finditer(module)]
    return sorted({name for p in payloads for name in KERNELS if name.encode() in p})


def export_for_cuda(fn, *specs) -> tuple[int, list[str]]:
    """(number of Triton kernel calls, names of the kernels lowered) of `fn` lowered for CUDA."""
    fn = fn if hasattr(fn, "trace") else jax.jit(fn)
    module = jax.export.export(fn, platforms=["cuda"], disabled_checks=CHECKS)(*specs).mlir_module()
    return module.count(CALL), lowered_kernels(module)


def activation_grad(x):
    return jax.grad(lambda x: ternary.ternary_activation(x, "triton").astype(jnp.float32).sum())(x)


def activation(x):
    return ternary.ternary_activation(x, "triton")


def steps(dtype: str, remat: str) -> tuple[tuple, tuple]:
    """export_for_cuda of the training step and of the evaluation step of `resnet18_bwx2` in
    `dtype`, on a mesh of one (CPU) device, 32x32 images, without a teacher."""
    c = default.get_config()
    c.num_classes, c.image_size, c.dtype, c.act_backend, c.remat = 10, 32, dtype, "triton", remat
    mesh = training.make_mesh(jax.devices()[:1])
    tx = training.create_optimizer(c, training.learning_rate_fn(c, 10))
    state = training.abstract_train_state(c, mesh, tx)
    batch = {"image": jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
    train = export_for_cuda(training.make_train_step(c, mesh, tx).jitted, state, batch, None)
    batch["mask"] = jax.ShapeDtypeStruct((4,), jnp.float32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return train, export_for_cuda(training.make_eval_step(c, mesh), variables, batch)


def new_ptx(seen: set) -> tuple[str, str]:
    """(kernel name, PTX) of the kernel jax-triton compiled since the last call (one expected)."""
    paths = set(glob.glob(os.path.join(DUMP, "*", "*.ptx"))) - seen
    assert len(paths) == 1, sorted(paths)
    seen |= paths
    path = paths.pop()
    with open(path) as f:
        return os.path.basename(path).removesuffix(".ptx"), f.read()


def main(capabilities):
    calls, kernels, ptx, seen = {}, {}, {}, set()

    def record(case, exported):
        calls[case], kernels[case] = exported

    for capability in capabilities:
        ternary.assume_cuda_gpu(capability)  # no GPU here to ask
        jax.clear_caches()  # else JAX reuses its lowering for the previous capability
        for dtype in ("float32", "bfloat16", "float16"):
            spec = jax.ShapeDtypeStruct(ACTIVATION_SHAPE, dtype)
            for case, fn in (("activation_grad", activation_grad), ("activation", activation)):
                record(f"{capability}/{case}/{dtype}", export_for_cuda(fn, spec))
                name, code = new_ptx(seen)
                ptx[f"{capability}/{name}/{dtype}"] = code
    for dtype, remat in (("float32", "off"), ("bfloat16", "on")):
        train, evaluation = steps(dtype, remat)
        record(f"train/{dtype}/remat={remat}", train)
        record(f"eval/{dtype}", evaluation)
    print(json.dumps({"calls": calls, "kernels": kernels, "ptx": ptx,
                      "activation_size": math.prod(ACTIVATION_SHAPE)}))


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [90])
