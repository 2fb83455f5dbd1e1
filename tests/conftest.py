"""Test setup: 8 simulated CPU devices (for shard_map tests), TensorFlow kept quiet, and one
persistent XLA compilation cache for the session (the tests build the same networks many times,
also in the CLI subprocesses they start, which inherit these variables)."""
import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="sttn-jax-test-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402


def has_cuda_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


requires_gpu = pytest.mark.skipif(not has_cuda_gpu(), reason="needs a CUDA GPU")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (parity checks), restoring the setting afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory):
    """The fabricated tiny ImageNet of configs/smoke.py, prepared once per test session through
    the real TFDS imagenet2012 builder."""
    from sttn_jax import data

    d = tmp_path_factory.mktemp("smoke_data")
    data.ensure_fake_imagenet(str(d))
    return str(d)


# The smoke run that tests compare against: 6 steps = 2 epochs of 3 (an evaluation, a best
# checkpoint and an epoch boundary on the way), a checkpoint after every step.
SMOKE_RUN = dict(num_train_steps=6, checkpoint_every_steps=1, keep_checkpoints=2)


@pytest.fixture(scope="session")
def uninterrupted_smoke_run(smoke_data_dir, tmp_path_factory):
    """(result, workdir) of one uninterrupted in-process SMOKE_RUN on the 8 simulated devices;
    interrupted runs of the same config must end with the same checkpoint, bit for bit."""
    from sttn_jax import train_loop

    workdir = tmp_path_factory.mktemp("uninterrupted")
    return train_loop.train_and_evaluate(smoke_config(smoke_data_dir, **SMOKE_RUN), workdir), workdir


def latest_checkpoint(workdir):
    """(state as a dict of numpy arrays, meta) of the newest checkpoint in workdir/checkpoints."""
    import orbax.checkpoint as ocp

    from sttn_jax import run_checkpoints

    manager = run_checkpoints.checkpoint_manager(Path(workdir) / "checkpoints", 100)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def smoke_config(data_dir, **overrides):
    """configs/smoke.py reading `data_dir`, without a progress bar, with `overrides` applied."""
    from configs import smoke

    c = smoke.get_config()
    c.data_dir = data_dir
    c.progress_bar = False
    for k, v in overrides.items():
        c[k] = v
    return c


def assert_float64_runs_agree(one, other, bias_atol=5e-9, rtol=1e-8):
    """Two float64 train states that differ only in summation order (device or process count)
    agree: integers exactly, every float leaf within `rtol` of its largest magnitude.

    Block-conv biases are compared on an absolute scale: they feed a BatchNorm, so their gradient
    is rounding noise (~1e-17), which Adam (eps 1e-8) turns into ~lr * noise / eps steps; 5e-9 is
    1e-6 of an Adam step. Those ~1e-10 offsets feed the next steps, and Adam's normalisation
    amplifies rounding in near-zero gradients: measured about 2e-9 to 6e-9 after 3 steps, where a
    real mismatch (a wrong batch, a missing mean) is 1e-4 or more. Returns the worst relative error.
    """
    import numpy as np

    assert jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(other)
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree_util.tree_leaves(other)):
        a, b = np.asarray(a), np.asarray(b)
        key = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype, key
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(a, b, err_msg=key)
            continue
        assert a.dtype == np.float64, f"{key} is {a.dtype}: not a float64 run"
        if "conv" in key and key.endswith("['bias']"):
            np.testing.assert_allclose(b, a, rtol=0, atol=bias_atol, err_msg=key)
        else:
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300)))
    assert worst <= rtol, worst
    return worst
