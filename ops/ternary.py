"""`ternary_activation`: STTN's ternary activation as a `jax.custom_vjp`.

Forward: x < -0.5 -> -1, -0.5 <= x < 0.5 -> 0, x >= 0.5 -> +1, in the input's dtype; NaN stays NaN
(the original turns it into +1, hiding a diverged run). Backward (straight-through, inclusive
bounds): grad_in = grad_out where -1 <= x <= 1, else 0; only that boolean mask is saved, not x.

Backends, bit-identical: "xla" fuses with its neighbours; "triton" runs `ops.kernels` through
jax-triton (CUDA GPUs; the mask only where differentiated); "auto" is XLA (faster in the models).
"""

import functools

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "triton", "xla")
TRITON_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _forward_xla(x):
    dtype = x.dtype
    y = jnp.where(x >= 0.5, jnp.ones((), dtype),
                  jnp.where(x < -0.5, -jnp.ones((), dtype), jnp.zeros((), dtype)))
    y = jnp.where(jnp.isnan(x), x, y)
    keep = (x >= -1) & (x <= 1)
    return y, keep


def _triton_call(flat, with_mask: bool):
    import jax_triton as jt

    from ops import kernels

    scalars, meta, grid = kernels.launch_args(flat.size, flat.dtype.itemsize)
    y = jax.ShapeDtypeStruct(flat.shape, flat.dtype)
    if not with_mask:
        return jt.triton_call(flat, *scalars, kernel=kernels.ternary_values_kernel,
                              out_shape=y, grid=grid, **meta)
    return jt.triton_call(flat, *scalars, kernel=kernels.ternary_forward_kernel,
                          out_shape=(y, jax.ShapeDtypeStruct(flat.shape, jnp.bool_)),
                          grid=grid, **meta)


def _varying_like(out, x):
    """`out` typed as varying over the shard_map axes `x` varies over: jax-triton's outputs carry
    none, and inside shard_map a custom_vjp's cotangent must be typed like its input."""
    varying = lambda a: jax.typeof(a).mat.varying  # noqa: E731  (jax 0.10 and 0.11)
    return jax.lax.pcast(out, tuple(sorted(varying(x) - varying(out))), to="varying")


def _elementwise_batching(fn):
    """Elementwise `fn` with a vmap rule (jax-triton has none): a batch is just a bigger array."""
    fn = jax.custom_batching.custom_vmap(fn)

    @fn.def_vmap
    def _(axis_size, in_batched, x):
        del axis_size
        out = fn(x)
        return out, jax.tree_util.tree_map(lambda _: in_batched[0], out)

    return fn


@_elementwise_batching
def _forward_triton(x):
    """(y, keep) by the Triton kernel."""
    if x.size == 0:
        return _forward_xla(x)
    y, keep = _triton_call(x.reshape(-1), with_mask=True)
    return _varying_like(y.reshape(x.shape), x), _varying_like(keep.reshape(x.shape), x)


@_elementwise_batching
def _values_triton(x):
    """y alone, by the Triton kernel that writes no mask: for the primal, never differentiated."""
    if x.size == 0:
        return _forward_xla(x)[0]
    return _varying_like(_triton_call(x.reshape(-1), with_mask=False).reshape(x.shape), x)


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason() -> str | None:
    """None when the Triton backend can run here, else a sentence saying why not."""
    try:
        devices = jax.devices()
    except RuntimeError:
        devices = []
    return triton_unavailable_on(devices[0] if devices else None)


def triton_unavailable_on(device) -> str | None:
    """None when the Triton backend can run on `device` (or None), else a sentence saying why."""
    platform = getattr(device, "platform", None)
    if platform == "tpu":  # the TPU compiler has no Triton (CUDA) kernels to call
        return ("backend='triton' runs on CUDA GPUs only, not on a TPU; use backend='xla' "
                "(or 'auto', which picks XLA there)")
    if platform != "gpu" or "cuda" not in device.client.platform_version.lower():
        return ("backend='triton' needs a CUDA GPU, and JAX sees none here "
                f"(default backend: {jax.default_backend()}); use backend='xla' or 'auto'")
    try:
        import jax_triton  # noqa: F401
    except ImportError as e:
        return (f"backend='triton' needs jax-triton, which failed to import ({e}); "
                "install the 'gpu' extra (pip install 'sttn-jax[gpu]') or use backend='xla'")
    return None


def assume_cuda_gpu(capability: int) -> None:
    """For lowering ahead of time without a GPU (for the rest of the process): jax-triton compiles
    for compute `capability`; call jax.clear_caches() before lowering for another."""
    global triton_unavailable_reason
    from jax_triton import triton_lib

    triton_unavailable_reason = lambda: None  # noqa: E731
    triton_lib.triton_kernel_call_lib.get_compute_capability = lambda device: capability


def backend_problem(backend: str) -> str | None:
    """Why `backend` cannot run here (unknown, or Triton without a CUDA GPU), else None."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    return triton_unavailable_reason() if backend == "triton" else None


def resolve_backend(backend: str, dtype) -> str:
    """The backend that will actually run for `backend` and `dtype`: "triton" or "xla"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    dtype = jnp.dtype(dtype)
    if backend == "triton":
        reason = triton_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float32, bfloat16 and float16, not "
                            f"{dtype}; use backend='xla'")
        return "triton"
    # auto: XLA fuses the activation into the BatchNorm or sum that computes its input; the
    # Triton kernel reads and writes that tensor once more.
    return "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ternary(x, backend):
    # Where nothing differentiates (inference) JAX calls this, not _ternary_fwd: no mask needed.
    return _values_triton(x) if backend == "triton" else _forward_xla(x)[0]


def _ternary_fwd(x, backend):
    """(y, keep): y, and the mask as the residual for _ternary_bwd."""
    return _forward_triton(x) if backend == "triton" else _forward_xla(x)


def _ternary_bwd(backend, keep, g):
    del backend
    return (jnp.where(keep, g, jnp.zeros((), g.dtype)),)


_ternary.defvjp(_ternary_fwd, _ternary_bwd)


def ternary_activation(x, backend: str = "auto"):
    """Ternarizes `x` to {-1, 0, +1} (same shape and dtype) with STTN's straight-through gradient;
    backend: "auto" (XLA), "triton" (error without a CUDA GPU) or "xla"."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"ternary_activation takes a floating-point array, not {x.dtype}")
    return _ternary(x, resolve_backend(backend, x.dtype))
