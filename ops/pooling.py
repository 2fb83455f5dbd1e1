"""`max_pool`: PyTorch's MaxPool2d (NHWC) with a gradient that needs no scatter. The gradient goes
to the first maximum of each window (PyTorch's rule, and JAX's), but JAX's `select_and_scatter`
is a costly scatter on GPUs: here the forward pass keeps, per output, the window position of that
maximum (int8), and each input gathers the gradients of the windows that chose it.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def output_size(x, window: int, stride: int, padding: int) -> tuple[int, int]:
    """(height, width) of a window's outputs over NHWC `x` (PyTorch's floor size)."""
    _, h, w, _ = x.shape
    return (h + 2 * padding - window) // stride + 1, (w + 2 * padding - window) // stride + 1


def window_views(x, window: int, stride: int, padding: int, pad_value=0):
    """The window*window strided views of NHWC `x` padded with `pad_value`, in the window's
    row-major order: view i * window + j holds, for every output, its window's element (i, j)."""
    n, _, _, c = x.shape
    oh, ow = output_size(x, window, stride, padding)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                 constant_values=pad_value)
    last_h, last_w = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    return [lax.slice(xp, (0, i, j, 0), (n, i + last_h, j + last_w, c), (1, stride, stride, 1))
            for i in range(window) for j in range(window)]


def _pool(x, window: int, stride: int, padding: int):
    # Not `reduce_window`, which XLA's GPU compiler computes and leaves in float32 for bfloat16.
    return functools.reduce(jnp.maximum, window_views(x, window, stride, padding, -jnp.inf))


def max_pool(x, window: int, stride: int, padding: int = 0):
    """nn.MaxPool2d(window, stride, padding) on an NHWC map (padding -inf, floor output size)."""
    if min(output_size(x, window, stride, padding)) < 1:
        raise ValueError(f"max_pool: a {window}x{window} window (padding {padding}) does not fit a "
                         f"{x.shape[1]}x{x.shape[2]} map; use a larger image")
    if window * window > 127:
        raise ValueError(f"max_pool: windows up to 11x11 (positions kept as int8), got {window}")
    return _max_pool(x, window, stride, padding, x.shape[1], x.shape[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _max_pool(x, window, stride, padding, h, w):
    return _pool(x, window, stride, padding)


def _max_pool_fwd(x, window, stride, padding, h, w):
    y = _pool(x, window, stride, padding)
    views = window_views(x, window, stride, padding, -jnp.inf)
    chosen = jnp.zeros(y.shape, jnp.int8)  # the first position holding the maximum
    for k in reversed(range(len(views))):
        chosen = jnp.where(views[k] == y, jnp.int8(k), chosen)
    return y, chosen


def _max_pool_bwd(window, stride, padding, h, w, chosen, g):
    oh, ow = chosen.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    dx = None
    for i in range(window):
        for j in range(window):
            mine = jnp.where(chosen == i * window + j, g, zero)
            # put output (a, b) at padded input (stride * a + i, stride * b + j)
            hi_h = h + 2 * padding - i - (stride * (oh - 1) + 1)
            hi_w = w + 2 * padding - j - (stride * (ow - 1) + 1)
            placed = lax.pad(mine, zero, ((0, 0, 0), (i, hi_h, stride - 1), (j, hi_w, stride - 1),
                                          (0, 0, 0)))
            dx = placed if dx is None else dx + placed
    return (dx[:, padding:padding + h, padding:padding + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
