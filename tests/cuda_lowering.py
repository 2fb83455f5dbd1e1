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
import collections
import glob
import json
import math
import os
import shutil
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="jax-triton-dump-")
atexit.register(shutil.rmtree, DUMP, ignore_errors=True)
os.environ["JAX_TRITON_DUMP_DIR"] = DUMP  # read when jax_triton is imported: PTX lands here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax_triton import triton_lib  # noqa: E402

from configs import default  # noqa: E402
from ops import ternary  # noqa: E402
from sttn_jax import training  # noqa: E402

# The kernel call is a custom call without export's compatibility guarantee: allowed here, where
# the exported module is only inspected. (jax-triton 0.3 names it triton_kernel_call, 0.4
# triton_kernel_call_ffi; CALL counts both.)
CHECKS = [jax.export.DisabledSafetyCheck.custom_call(name)
          for name in ("triton_kernel_call", "triton_kernel_call_ffi")]
CALL = "stablehlo.custom_call @triton_kernel_call"
ACTIVATION_SHAPE = (8, 56, 56, 64)  # a ResNet-18 stage-1 activation at batch 8


LOWERED = collections.Counter()  # kernel name -> lowerings, by the wrapper below


def _recording(get_or_create):
    def wrapper(*args, **kwargs):
        # the @triton.jit function among the arguments, or in the one that holds it (`.fn`)
        kernel = next(k for a in (*args, *kwargs.values()) for k in (a, getattr(a, "fn", None))
                      if hasattr(k, "arg_names"))
        LOWERED[kernel.__name__] += 1
        return get_or_create(*args, **kwargs)
    return wrapper


# jax-triton's lowering rule asks this for every call's compiled kernel (cached or not): in 0.3 a
# function, in 0.4 a method of the TritonFunction that wraps the kernel
if hasattr(triton_lib, "get_or_create_triton_kernel"):
    triton_lib.get_or_create_triton_kernel = _recording(triton_lib.get_or_create_triton_kernel)
else:
    triton_lib.TritonFunction.get_or_create_kernel = _recording(
        triton_lib.TritonFunction.get_or_create_kernel)


def export_for_cuda(fn, *specs) -> tuple[int, list[str]]:
    """(number of Triton kernel calls, names of the kernels lowered) of `fn` lowered for CUDA."""
    fn = fn if hasattr(fn, "trace") else jax.jit(fn)
    LOWERED.clear()
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=CHECKS)(*specs)
    return exported.mlir_module().count(CALL), sorted(LOWERED)


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
