"""Test setup: 8 simulated CPU devices (for shard_map tests), TensorFlow kept quiet, and one
persistent XLA compilation cache for the session (the tests build the same networks many times,
also in the CLI subprocesses they start, which inherit these variables)."""
import os
import tempfile

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


def smoke_config(data_dir, **overrides):
    """configs/smoke.py reading `data_dir`, without a progress bar, with `overrides` applied."""
    from configs import smoke

    c = smoke.get_config()
    c.data_dir = data_dir
    c.progress_bar = False
    for k, v in overrides.items():
        c[k] = v
    return c
