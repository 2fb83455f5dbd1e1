"""Triton kernels for the ternary activation.

Only `triton` is imported here, never `jax_triton`: the same kernel is launched from JAX on a GPU
(through jax-triton, see `ops.ternary`) and from torch CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`) in the tests, which is how CI checks it without a GPU.
"""
import triton
import triton.language as tl

# Block size and warps per element size, measured on an H100 (DESIGN.md, "GPU facts"): with the
# default 4 warps the kernel ran at 60 % (fp32) / 32 % (bf16) of copy bandwidth.
LAUNCH_CONFIG = {
    4: {"BLOCK_SIZE": 2048, "num_warps": 16},  # float32
    2: {"BLOCK_SIZE": 1024, "num_warps": 8},  # bfloat16, float16
}


@triton.jit
def ternary_forward_kernel(x_ptr, y_ptr, keep_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    """y = -1 / 0 / +1 for x < -0.5 / -0.5 <= x < 0.5 / x >= 0.5 (NaN stays NaN);
    keep = (-1 <= x <= 1), the mask the backward pass multiplies the gradient by."""
    # int64 offsets: a 256x56x56x64 activation has 51M elements, and larger batches overflow int32.
    pid = tl.program_id(axis=0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0)
    # Compare and build the levels in float32 (exact for every 16-bit float: no boundary moves),
    # then cast back; Triton's interpreter also needs it to see a bfloat16 NaN.
    xf = x.to(tl.float32)
    y = tl.where(xf >= 0.5, 1.0, tl.where(xf < -0.5, -1.0, 0.0))
    y = tl.where(xf != xf, xf, y).to(x.dtype)  # NaN in, NaN out
    keep = (xf >= -1.0) & (xf <= 1.0)
    tl.store(y_ptr + offsets, y, mask=in_bounds)
    tl.store(keep_ptr + offsets, keep, mask=in_bounds)


def launch_config(itemsize: int) -> dict:
    """Block size and warp count for an element of `itemsize` bytes (fp32 or 16-bit floats)."""
    try:
        return dict(LAUNCH_CONFIG[itemsize])
    except KeyError:
        raise ValueError(
            f"the Triton ternary kernel supports float32, bfloat16 and float16, not {itemsize}-byte "
            "elements; use backend='xla' for other dtypes") from None


def ternary_forward_torch(x):
    """Runs the kernel on a torch tensor (a CPU tensor under TRITON_INTERPRET=1, or a CUDA one).

    Returns (y, keep). Used by the tests to check the kernel against the XLA expression.
    """
    import torch

    flat = x.contiguous().reshape(-1)
    y = torch.empty_like(flat)
    keep = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    cfg = launch_config(flat.element_size())
    grid = (triton.cdiv(flat.numel(), cfg["BLOCK_SIZE"]),)
    ternary_forward_kernel[grid](flat, y, keep, flat.numel(), BLOCK_SIZE=cfg["BLOCK_SIZE"],
                                 num_warps=cfg["num_warps"])
    return y.reshape(x.shape), keep.reshape(x.shape)
