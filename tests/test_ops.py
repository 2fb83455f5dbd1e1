"""The STTN operators against the original semantics (docs/original.md), exactly."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import ops
from ops import binary_pair, ternary
from tests.conftest import requires_gpu

REPO = Path(__file__).resolve().parents[1]


def boundary_grid(dtype):
    """Every interesting value in `dtype`: both thresholds and gradient bounds with their
    neighbours, signed zeros, infinities, NaN, and a sweep of ordinary values."""
    dtype = np.dtype(dtype)
    pts = []
    for b in (-1.0, -0.5, 0.5, 1.0):
        v = np.array(b, dtype)
        pts += [np.nextafter(v, np.array(-np.inf, dtype)), v, np.nextafter(v, np.array(np.inf, dtype))]
    pts += [np.array(v, dtype) for v in (0.0, -0.0, np.inf, -np.inf, 3.0, -3.0, 1e-30, -1e-30)]
    sweep = np.linspace(-2, 2, 401).astype(dtype)
    return np.concatenate([np.array(pts, dtype), sweep])


def expected_forward(x):
    """The CUDA extension's forward, evaluated in float64 (exact: every value converts exactly),
    except NaN, which stays NaN (a documented deliberate difference)."""
    x64 = x.astype(np.float64)
    y = np.where(x64 >= 0.5, 1.0, np.where(x64 < -0.5, -1.0, 0.0))
    y = y.astype(x.dtype)
    return np.where(np.isnan(x), x, y)  # the very same NaN (sign and payload) passes through


def bits(a):
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_activation_forward_exact_on_boundary_grid(dtype):
    x = np.concatenate([boundary_grid(dtype), np.array([np.nan], dtype)])
    y = np.asarray(ops.ternary_activation(jnp.asarray(x), backend="xla"))
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(bits(y), bits(expected_forward(x)))
    assert np.isnan(y[-1])
    # the thresholds themselves: -0.5 -> 0, +0.5 -> +1
    assert y[list(x).index(np.array(-0.5, dtype))] == 0
    assert y[list(x).index(np.array(0.5, dtype))] == 1


def test_activation_forward_exact_float64(x64):
    x = np.concatenate([boundary_grid(np.float64), [np.nan]])
    y = np.asarray(ops.ternary_activation(jnp.asarray(x)))
    assert y.dtype == np.float64
    np.testing.assert_array_equal(bits(y), bits(expected_forward(x)))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_activation_gradient_mask_inclusive_bounds(dtype):
    x = boundary_grid(dtype)
    g = np.random.default_rng(0).normal(size=x.shape).astype(dtype)
    grad = jax.grad(lambda v: jnp.sum(ops.ternary_activation(v) * g).astype(jnp.float32))(jnp.asarray(x))
    x64 = x.astype(np.float64)
    want = np.where((x64 >= -1) & (x64 <= 1), g, 0).astype(dtype)
    np.testing.assert_array_equal(np.asarray(grad), want)
    one, m_one = np.array(1, dtype), np.array(-1, dtype)
    for v, passes in [(one, True), (m_one, True), (np.nextafter(one, np.array(2, dtype)), False),
                      (np.nextafter(m_one, np.array(-2, dtype)), False)]:
        gv = jax.grad(lambda t: ops.ternary_activation(t).astype(jnp.float32))(jnp.asarray(v))
        assert float(gv) == (1.0 if passes else 0.0), (v, gv)


def test_activation_saves_only_a_boolean_mask():
    x = jnp.linspace(-2, 2, 64, dtype=jnp.float32)
    _, vjp = jax.vjp(lambda v: ops.ternary_activation(v, backend="xla"), x)
    residuals = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "dtype")]
    assert residuals, "the vjp closure should carry the mask"
    assert all(r.dtype == jnp.bool_ for r in residuals), [r.dtype for r in residuals]


def test_activation_under_jit_vmap_grad_and_shard_map():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 4)) * 1.5
    ref = expected_forward(np.asarray(x))
    np.testing.assert_array_equal(jax.jit(ops.ternary_activation)(x), ref)
    np.testing.assert_array_equal(jax.vmap(ops.ternary_activation)(x), ref)
    np.testing.assert_array_equal(jax.vmap(jax.vmap(ops.ternary_activation))(x), ref)
    g = jax.jit(jax.grad(lambda v: jnp.sum(ops.ternary_activation(v) * v)))(x)
    want = np.where(np.abs(np.asarray(x)) <= 1, np.asarray(x), 0) + 0  # d/dv of y*v with STE: y + v*mask
    np.testing.assert_allclose(g, want + ref, rtol=0, atol=0)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    f = jax.jit(jax.shard_map(lambda v: ops.ternary_activation(v), mesh=mesh, in_specs=P("data"),
                              out_specs=P("data")))
    np.testing.assert_array_equal(f(x), ref)


def test_activation_errors_name_the_fix():
    x = jnp.ones((4,))
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(RuntimeError, match="CUDA GPU.*backend='xla'"):
            ops.ternary_activation(x, backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.ternary_activation(x, backend="cuda")
    with pytest.raises(TypeError, match="floating-point"):
        ops.ternary_activation(jnp.ones((4,), jnp.int32))
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        assert ternary.resolve_backend("auto", dtype) == "xla"  # on every platform


# --- The Triton kernel on the CPU, through Triton's interpreter --------------------------------

@pytest.fixture(scope="module")
def interpreted_kernels():
    """A private copy of ops.kernels whose @triton.jit was applied with TRITON_INTERPRET=1."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_kernels_interpreted", REPO / "ops" / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module, torch


def to_torch(torch, x):
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def from_torch(torch, t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def ternary_forward_torch(kernels, x, with_mask: bool = True):
    """Runs a kernel of `kernels` (ops.kernels or its interpreted copy) on a torch tensor (a CPU
    tensor under TRITON_INTERPRET=1, or a CUDA one): `ternary_forward_kernel` -> (y, keep), or
    with_mask=False `ternary_values_kernel` -> y, launched as jax-triton launches them."""
    import torch

    flat = x.contiguous().reshape(-1)
    y = torch.empty_like(flat)
    scalars, meta, grid = kernels.launch_args(flat.numel(), flat.element_size())
    if not with_mask:
        kernels.ternary_values_kernel[grid](flat, *scalars, y, **meta)  # jax-triton's order
        return y.reshape(x.shape)
    keep = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    kernels.ternary_forward_kernel[grid](flat, *scalars, y, keep, **meta)
    return y.reshape(x.shape), keep.reshape(x.shape)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_triton_kernel_in_interpreter_equals_xla(interpreted_kernels, dtype):
    kernels, torch = interpreted_kernels
    rng = np.random.default_rng(1)
    grid = np.concatenate([boundary_grid(dtype), np.array([np.nan, -np.nan], dtype)])
    # random values, a size that is not a multiple of the block, and the boundary grid
    x = np.concatenate([grid, (rng.normal(size=5003) * 1.2).astype(dtype)]).reshape(-1)
    y_t, keep_t = ternary_forward_torch(kernels, to_torch(torch, x))
    y_t, keep_t = from_torch(torch, y_t), keep_t.numpy()
    y_x, keep_x = ternary._forward_xla(jnp.asarray(x))
    np.testing.assert_array_equal(bits(y_t), bits(np.asarray(y_x)))
    np.testing.assert_array_equal(keep_t, np.asarray(keep_x))
    np.testing.assert_array_equal(bits(y_t), bits(expected_forward(x)))
    # the kernel without the mask (inference) writes the same values
    values = from_torch(torch, ternary_forward_torch(kernels, to_torch(torch, x), with_mask=False))
    np.testing.assert_array_equal(bits(values), bits(y_t))


def test_triton_kernel_rejects_other_dtypes(interpreted_kernels):
    kernels, _ = interpreted_kernels
    with pytest.raises(ValueError, match="backend='xla'"):
        kernels.launch_config(8)


# Per dtype: x is loaded and y stored 16 bytes per thread; the boolean mask is stored 4 (float32)
# or 8 (16-bit) bytes per thread.
EXPECTED_ACCESSES = {
    "float32": {"ld": {"ld.global.v4.b32"}, "st": {"st.global.v4.b32", "st.global.b32"}},
    "bfloat16": {"ld": {"ld.global.v4.b32"}, "st": {"st.global.v4.b32", "st.global.v2.b32"}},
    "float16": {"ld": {"ld.global.v4.b32"}, "st": {"st.global.v4.b32", "st.global.v2.b32"}},
}
def global_access_widths(ptx: str) -> dict[str, set[str]]:
    """{"ld": {...}, "st": {...}}: the global load and store instructions in `ptx`, such as
    'ld.global.v4.b32' (four 32-bit words per thread: 128-bit accesses)."""
    return {op: set(re.findall(rf"{op}\.global(?:\.[a-z0-9]+)+", ptx)) for op in ("ld", "st")}


# The kernel without the mask stores y alone.
VALUES_ACCESSES = {"ld": {"ld.global.v4.b32"}, "st": {"st.global.v4.b32"}}


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", sorted(EXPECTED_ACCESSES))
def test_triton_kernel_compiles_for_real_gpus_with_128_bit_accesses(dtype, capability):
    """Both kernels compiled ahead of time for an A100 (sm_80) and an H100 (sm_90), specialized as
    jax-triton specializes them at launch: they compile, and every access to x and y is 128 bits
    wide (a scalar or 64-bit access costs bandwidth on a kernel that only moves memory)."""
    pytest.importorskip("triton")
    from ops import kernels

    for kernel, expected in ((kernels.ternary_forward_kernel, EXPECTED_ACCESSES[dtype]),
                             (kernels.ternary_values_kernel, VALUES_ACCESSES)):
        ptx = kernels.compile_ptx(dtype, capability, kernel=kernel)
        assert f".target sm_{capability}" in ptx
        assert f".entry {kernel.__name__}(" in ptx
        assert global_access_widths(ptx) == expected, kernel.__name__
        # a size that is not a multiple of 16 still compiles, with scalar accesses
        odd = global_access_widths(kernels.compile_ptx(dtype, capability, n=1001,
                                                               kernel=kernel))
        assert odd["ld"] and not any(".v" in op for op in odd["ld"])


# jax-triton and JAX's CUDA plugin, installed apart by `make install-test` (see the Makefile)
CUDA_LOWERING = Path(sys.prefix) / "cuda-lowering"


def ptx_code(ptx: str) -> str:
    """PTX without its debug information (sections, `.file`, `.loc`), which names the source
    file's path and lines: Triton's on-disk cache may hold the same kernel compiled from another
    checkout."""
    code = ptx.split("\t.section\t.debug")[0]
    return "\n".join(line for line in code.splitlines()
                     if not line.lstrip().startswith((".file", ".loc")))


def test_jax_triton_lowers_the_kernel_and_the_model_for_real_gpus():
    """The Triton backend through jax-triton's own lowering for sm_80 and sm_90, no GPU needed
    (tests/cuda_lowering.py): the kernel takes the arguments in the order jax-triton passes them,
    in every dtype; the PTX jax-triton compiles is the one checked above, instruction for
    instruction, so that check holds for what runs; the training step (its gradient inside
    shard_map) and the evaluation step lower, calling a kernel once per ternary activation (16),
    and once more per activation under remat, which recomputes them: the kernel that writes the
    backward pass's mask where the activation is differentiated, the one without it elsewhere."""
    pytest.importorskip("triton")
    if (CUDA_LOWERING / "jax_triton").is_dir():
        path = [str(CUDA_LOWERING)]
    elif importlib.util.find_spec("jax_triton"):  # installed here (a GPU machine)
        path = []
    else:
        pytest.skip(f"needs jax-triton and JAX's CUDA plugin in {CUDA_LOWERING} (make install-test)")
    from ops import kernels

    path += [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "tests/cuda_lowering.py", "80", "90"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    n = result["activation_size"]
    calls, lowered = result["calls"], result["kernels"]
    forward, values = "ternary_forward_kernel", "ternary_values_kernel"
    for capability in (80, 90):
        for dtype in EXPECTED_ACCESSES:
            for case, name in (("activation_grad", forward), ("activation", values)):
                assert calls[f"{capability}/{case}/{dtype}"] == 1
                assert lowered[f"{capability}/{case}/{dtype}"] == [name]
                ptx = result["ptx"][f"{capability}/{name}/{dtype}"]
                expected = kernels.compile_ptx(dtype, capability, n, kernel=getattr(kernels, name))
                assert ptx_code(ptx) == ptx_code(expected), (capability, name, dtype)
    assert calls["train/float32/remat=off"] == 16
    assert calls["train/bfloat16/remat=on"] == 32
    assert calls["eval/float32"] == calls["eval/bfloat16"] == 16
    for dtype, remat in (("float32", "off"), ("bfloat16", "on")):
        assert lowered[f"train/{dtype}/remat={remat}"] == [forward]
        assert lowered[f"eval/{dtype}"] == [values]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_backend_on_gpu_equals_xla(dtype):
    x = (jax.random.normal(jax.random.PRNGKey(0), (16, 9, 9, 40)) * 1.5).astype(dtype)
    x = x.at[0, 0, 0, :4].set(jnp.array([0.5, -0.5, 1.0, -1.0], dtype))
    f_t = jax.jit(lambda v: ops.ternary_activation(v, backend="triton"))
    f_x = jax.jit(lambda v: ops.ternary_activation(v, backend="xla"))
    np.testing.assert_array_equal(bits(f_t(x)), bits(f_x(x)))
    g = lambda b: jax.jit(jax.grad(lambda v: jnp.sum(ops.ternary_activation(v, backend=b) * v).astype(jnp.float32)))
    np.testing.assert_array_equal(bits(g("triton")(x)), bits(g("xla")(x)))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sm = lambda b: jax.jit(jax.shard_map(lambda v: ops.ternary_activation(v, backend=b), mesh=mesh,
                                         in_specs=P("data"), out_specs=P("data")))
    np.testing.assert_array_equal(bits(sm("triton")(x)), bits(sm("xla")(x)))
    np.testing.assert_array_equal(bits(jax.vmap(lambda v: ops.ternary_activation(v, backend="triton"))(x)),
                                  bits(f_x(x)))


# --- fold_binary_pair --------------------------------------------------------------------------

def numpy_fold(w1, w2):
    """Original BinOp.binarizeConvParams in numpy, per output channel, float64."""
    c_out = w1.shape[-1]
    n = w1[..., 0].size
    alpha = np.array([(np.abs(w1[..., o]).sum() + np.abs(w2[..., o]).sum()) / (2 * n) for o in range(c_out)])
    return alpha * np.sign(w1), alpha * np.sign(w2), alpha


def numpy_latent_grad(w, g):
    """Original BinOp.updateBinaryGradWeight in numpy (G zeroed where |W| > 1.96)."""
    out = np.empty_like(g)
    for o in range(w.shape[-1]):
        s = np.sign(w[..., o])
        m_add = (s * g[..., o]).sum() / s.size * s
        m = np.where(np.abs(w[..., o]) > 1.96, 0.0, g[..., o])
        out[..., o] = m + m_add
    return out


def latent_pair(key, shape, dtype=jnp.float64):
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, shape, dtype) * 1.2
    w2 = jax.random.normal(k2, shape, dtype) * 1.2
    w1 = w1.at[0, 0, 0, :].set(0.0)  # sign(0) = 0
    w2 = w2.at[1, 1, 0, 0].set(2.5)  # beyond the 1.96 gradient cut-off
    return w1, w2


def test_folded_zeros_are_where_the_fold_is_zero():
    w1, w2 = latent_pair(jax.random.PRNGKey(3), (3, 3, 5, 7), jnp.float32)
    w2 = w2.at[0, 0, 0, :3].set(0.0)  # both 0 (zero), and 0 beside a nonzero (not zero)
    zeros = np.asarray(ops.folded_zeros(w1, w2))
    np.testing.assert_array_equal(zeros, np.asarray(ops.fold_binary_pair(w1, w2)) == 0)
    assert 0 < zeros.mean() < 1 and zeros[0, 0, 0, :3].all() and not zeros[0, 0, 0, 3:].any()


def test_fold_forward_and_vjp_match_the_original_formulas(x64):
    w1, w2 = latent_pair(jax.random.PRNGKey(0), (3, 3, 5, 7))
    b1, b2, alpha = numpy_fold(np.asarray(w1), np.asarray(w2))
    t, vjp = jax.vjp(ops.fold_binary_pair, w1, w2)
    np.testing.assert_allclose(t, b1 + b2, rtol=1e-14, atol=0)
    np.testing.assert_allclose(ops.pair_alpha(w1, w2), alpha, rtol=1e-14)
    levels = np.round(np.asarray(t) / alpha, 12)
    nonzero_latents = (np.asarray(w1) != 0) & (np.asarray(w2) != 0)
    assert set(np.unique(levels[nonzero_latents])) == {-2.0, 0.0, 2.0}  # the ternary levels
    assert set(np.unique(levels[~nonzero_latents])) <= {-1.0, 1.0}  # sign(0) = 0 leaves one alpha
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(1), t.shape, jnp.float64))
    d1, d2 = vjp(jnp.asarray(g))
    np.testing.assert_allclose(d1, numpy_latent_grad(np.asarray(w1), g), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(d2, numpy_latent_grad(np.asarray(w2), g), rtol=1e-13, atol=1e-15)
    assert float(d2[1, 1, 0, 0]) == pytest.approx(float(np.sign(2.5) * (np.sign(np.asarray(w2)[..., 0]) * g[..., 0]).mean()))


def conv(x, k, stride=1):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_folded_convolution_equals_two_binary_convolutions(x64):
    w1, w2 = latent_pair(jax.random.PRNGKey(2), (3, 3, 4, 6))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 4), jnp.float64)
    ct = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 6), jnp.float64)

    def folded(x, w1, w2):
        return conv(x, ops.fold_binary_pair(w1, w2), 2)

    def two_convs(x, b1, b2):  # the original: two convolutions with the binarized kernels
        return conv(x, b1, 2) + conv(x, b2, 2)

    b1, b2, _ = numpy_fold(np.asarray(w1), np.asarray(w2))
    y_f, vjp_f = jax.vjp(folded, x, w1, w2)
    y_o, vjp_o = jax.vjp(two_convs, x, jnp.asarray(b1), jnp.asarray(b2))
    np.testing.assert_allclose(y_f, y_o, rtol=1e-12, atol=1e-12)
    dx_f, dw1, dw2 = vjp_f(ct)
    dx_o, g1, g2 = vjp_o(ct)
    np.testing.assert_allclose(dx_f, dx_o, rtol=1e-12, atol=1e-12)
    # dL/dB1 = dL/dB2 = dL/dT, and the latent gradients follow the original rule from them
    np.testing.assert_allclose(dw1, numpy_latent_grad(np.asarray(w1), np.asarray(g1)), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dw2, numpy_latent_grad(np.asarray(w2), np.asarray(g2)), rtol=1e-11, atol=1e-12)


def test_fold_rejects_mismatched_kernels():
    with pytest.raises(ValueError, match="one shape"):
        ops.fold_binary_pair(jnp.ones((3, 3, 2, 4)), jnp.ones((3, 3, 2, 5)))


def test_clamp_touches_exactly_the_latent_kernels():
    params = {
        "features_0": {"kernel": jnp.full((2, 2), 3.0)},
        "features_4": {"conv1": {"kernel_1": jnp.array([-3.0, 0.5, 2.0]), "kernel_2": jnp.array([1.5, -0.2, -1.0]),
                                 "bias_1": jnp.array([5.0]), "bias_2": jnp.array([-5.0])},
                       "bn1": {"scale": jnp.array([4.0])}, "prelu1": {"slope": jnp.array([2.0])}},
        "fc": {"kernel": jnp.full((2,), -7.0), "bias": jnp.array([9.0])},
    }
    out = ops.clamp_latent_kernels(params)
    np.testing.assert_array_equal(out["features_4"]["conv1"]["kernel_1"], [-1.0, 0.5, 1.0])
    np.testing.assert_array_equal(out["features_4"]["conv1"]["kernel_2"], np.float32([1.0, -0.2, -1.0]))
    for path in (("features_0", "kernel"), ("fc", "kernel"), ("fc", "bias")):
        np.testing.assert_array_equal(out[path[0]][path[1]], params[path[0]][path[1]])
    for k in ("bias_1", "bias_2"):
        np.testing.assert_array_equal(out["features_4"]["conv1"][k], params["features_4"]["conv1"][k])
    np.testing.assert_array_equal(out["features_4"]["bn1"]["scale"], [4.0])
    assert sorted(binary_pair.latent_kernel_paths(params)) == ["features_4/conv1/kernel_1", "features_4/conv1/kernel_2"]


POOLS = [(3, 2, 1), (2, 2, 0), (3, 1, 1)]  # the stem's pool, the blocks' shortcut pool, overlap 2


@pytest.mark.parametrize("window,stride,padding", POOLS)
def test_max_pool_matches_torch_with_ties_exactly(x64, window, stride, padding):
    """Values and gradient of nn.MaxPool2d, which sends each window's gradient to its first
    maximum: integer inputs put ties in most windows and integer gradients make every sum exact,
    so any other choice or a lost overlap shows as a whole-number difference."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(window * 10 + stride)
    x = rng.integers(-2, 3, (2, 9, 8, 3)).astype(np.float64)
    y, vjp = jax.vjp(lambda a: ops.max_pool(a, window, stride, padding), jnp.asarray(x))
    g = rng.integers(-8, 9, y.shape).astype(np.float64)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, window, stride, padding)
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]),
                                  xt.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window,stride,padding", POOLS)
def test_max_pool_equals_jax_reduce_window_under_jit_and_vmap(dtype, window, stride, padding):
    """The same values and gradients as differentiating `reduce_window` (JAX's own rule), in the
    training dtypes, jitted and vmapped over an extra batch axis."""
    import flax.linen as nn

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-3, 4, (2, 2, 7, 10, 4)), dtype)
    g = jnp.asarray(rng.integers(-4, 5, (2,) + jax.eval_shape(
        lambda a: ops.max_pool(a, window, stride, padding), x[0]).shape), dtype)

    def grads(pool):
        f = jax.vmap(lambda a, b: jax.vjp(pool, a)[1](b)[0])
        return jax.jit(f)(x, g), jax.jit(jax.vmap(pool))(x)

    ours = grads(lambda a: ops.max_pool(a, window, stride, padding))
    jaxs = grads(lambda a: nn.max_pool(a, (window,) * 2, (stride,) * 2, ((padding,) * 2,) * 2))
    for a, b in zip(ours, jaxs):
        assert a.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_max_pool_error_names_the_fix():
    with pytest.raises(ValueError, match="does not fit a 2x2 map; use a larger image"):
        ops.max_pool(jnp.zeros((1, 2, 2, 1)), 3, 2)
    with pytest.raises(ValueError, match="windows up to 11x11"):
        ops.max_pool(jnp.zeros((1, 16, 16, 1)), 12, 1)
