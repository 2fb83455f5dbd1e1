"""Triton kernels for the ternary activation (with or without the backward pass's mask), their
launch configuration and ahead-of-time PTX compilation. Only `triton` is imported, never
`jax_triton`: the tests also run them under Triton's interpreter and compile them without a GPU.
"""
import triton
import triton.language as tl

# Block size and warps per element size: each thread moves 16 bytes of x and y per access.
LAUNCH_CONFIG = {
    4: {"BLOCK_SIZE": 2048, "num_warps": 16},  # float32: 4 elements per thread
    2: {"BLOCK_SIZE": 2048, "num_warps": 8},  # bfloat16, float16: 8 elements per thread
}
TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@triton.jit
def _load_block(x_ptr, n_div_16, BLOCK_SIZE: tl.constexpr, N_REM_16: tl.constexpr):
    """(offsets, in_bounds, x in float32) of this program's block. n = 16 * n_div_16 + N_REM_16
    lets the compiler see n divisible by 16 and vectorise (jax-triton declares it for no scalar)."""
    # int64 offsets: large batches of activations overflow int32.
    n_elements = n_div_16.to(tl.int64) * 16 + N_REM_16
    pid = tl.program_id(axis=0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0)
    # The levels in float32 (exact for 16-bit floats), which Triton's interpreter needs for NaN.
    return offsets, in_bounds, x.to(tl.float32)


@triton.jit
def _levels(xf):
    """-1 / 0 / +1 for xf < -0.5 / -0.5 <= xf < 0.5 / xf >= 0.5; NaN in, NaN out."""
    y = tl.where(xf >= 0.5, 1.0, tl.where(xf < -0.5, -1.0, 0.0))
    return tl.where(xf != xf, xf, y)


# The kernels' parameters in jax-triton's order: inputs (arrays, then scalars), then outputs.
@triton.jit
def ternary_forward_kernel(x_ptr, n_div_16, y_ptr, keep_ptr, BLOCK_SIZE: tl.constexpr,
                           N_REM_16: tl.constexpr):
    """y = the ternary levels of x, and keep = (-1 <= x <= 1), the backward pass's mask."""
    offsets, in_bounds, xf = _load_block(x_ptr, n_div_16, BLOCK_SIZE, N_REM_16)
    tl.store(y_ptr + offsets, _levels(xf).to(y_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(keep_ptr + offsets, (xf >= -1.0) & (xf <= 1.0), mask=in_bounds)


@triton.jit
def ternary_values_kernel(x_ptr, n_div_16, y_ptr, BLOCK_SIZE: tl.constexpr,
                          N_REM_16: tl.constexpr):
    """y alone, for inference: XLA cannot drop an unread output of a custom call."""
    offsets, in_bounds, xf = _load_block(x_ptr, n_div_16, BLOCK_SIZE, N_REM_16)
    tl.store(y_ptr + offsets, _levels(xf).to(y_ptr.dtype.element_ty), mask=in_bounds)


# Each kernel's non-constexpr parameters in order ({} is the element type).
ARG_TYPES = {ternary_forward_kernel: ("*{}", "i32", "*{}", "*i1"),
             ternary_values_kernel: ("*{}", "i32", "*{}")}


def launch_config(itemsize: int) -> dict:
    """Block size and warp count for an element of `itemsize` bytes (fp32 or 16-bit floats)."""
    try:
        return dict(LAUNCH_CONFIG[itemsize])
    except KeyError:
        raise ValueError(
            f"the Triton ternary kernel supports float32, bfloat16 and float16, not {itemsize}-byte "
            "elements; use backend='xla' for other dtypes") from None


def launch_args(n: int, itemsize: int) -> tuple[tuple, dict, tuple]:
    """(scalar arguments, constexpr and launch keywords, grid) for `n` elements of `itemsize`."""
    cfg = launch_config(itemsize)
    return (n // 16,), {**cfg, "N_REM_16": n % 16}, (triton.cdiv(n, cfg["BLOCK_SIZE"]),)


def compile_ptx(dtype: str, capability: int = 90, n: int = 1 << 20,
                kernel=ternary_forward_kernel) -> str:
    """PTX of `kernel` for `dtype` on an NVIDIA GPU of compute `capability` (90: H100), compiled
    here, GPU or not, its arguments specialized as jax-triton does at launch."""
    import types

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    backend = CUDABackend(target)
    element = TRITON_TYPES[dtype]
    arg_types = [t.format(element) for t in ARG_TYPES[kernel]]
    alignments = [0 if t.startswith("i") else 16 for t in arg_types]
    specialization = [
        native_specialize_impl(backend, types.SimpleNamespace(data_ptr=lambda a=a: a,
                                                              dtype=t.removeprefix("*")),
                               False, True, a > 0)
        for t, a in zip(arg_types, alignments)]
    attrs = {(i,): backend.parse_attr(attr) for i, (_, attr) in enumerate(specialization)}
    _, meta, _ = launch_args(n, 4 if element == "fp32" else 2)
    signature = {name: t for name, t in zip(kernel.arg_names, arg_types)}
    signature.update(BLOCK_SIZE="constexpr", N_REM_16="constexpr")
    source = ASTSource(kernel, signature, constexprs={"BLOCK_SIZE": meta["BLOCK_SIZE"],
                                                      "N_REM_16": meta["N_REM_16"]}, attrs=attrs)
    compiled = triton.compile(source, target=target, options={"num_warps": meta["num_warps"]})
    return compiled.asm["ptx"]
