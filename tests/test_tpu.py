"""The programs a TPU slice runs, compiled for one without a TPU (benchmarks/tpu_plan.py through
libtpu, which `make install-test` puts in .venv/tpu-compile), and what sttn-jax refuses there."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import pytest

from configs import default
from ops import ternary
from sttn_jax import training
from sttn_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# libtpu (the TPU compiler), installed apart from the test environment (see the Makefile)
TPU_COMPILE = Path(sys.prefix) / "tpu-compile"


@pytest.mark.long
def test_the_training_and_int8_evaluation_steps_compile_for_a_tpu_slice_without_one(tmp_path):
    """benchmarks/tpu_plan.py --smoke: XLA's TPU compiler compiles, for the 4 chips of a v5e:2x2
    slice, the TPU config's training step (student, its ResNet-50 teacher in train mode, Adam;
    BatchNorm statistics and gradients all-reduced over the chips) at 64x64, 2 per chip, and the
    merged model's int8 evaluation step (int8 convolutions; the sums all-reduced). A change that
    no longer lowers or compiles for a TPU fails here."""
    if not (TPU_COMPILE / "libtpu").is_dir():
        message = f"needs libtpu in {TPU_COMPILE} (make install-test)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TPU_COMPILE), str(ROOT)]),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tpu_plan.py"), "--smoke",
                           "--output-dir", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    [path] = tmp_path.glob("*_tpu-v5e-2x2-plan.json")
    result = json.loads(path.read_text())
    assert (result["device"], result["chips"], result["hosts"]) == ("TPU v5 lite", 4, 1)
    assert result["global_batch"] == 8 and result["image_size"] == 64
    train, int8 = result["train"]["bfloat16"], result["eval"]["int8"]
    # the state is donated: its buffers are the outputs' (aliased), a step's peak well under HBM
    assert 0.25 < train["arguments_gib"] < train["planned_peak_gib"] < 1 < 16
    assert train["alias_gib"] > 0.9 * train["outputs_gib"] > 0
    # per chip, 2 images: the student's forward and backward (about 0.9 GFLOP an image at 64x64)
    # and the teacher's forward (0.7): without the teacher or for all 4 chips it would be outside
    assert 3e9 < train["tflops"] * 1e12 < 6e9
    assert train["collectives"]["all-reduce"]["count"] >= 20  # gradients, BatchNorm statistics
    assert int8["planned_peak_gib"] < 0.1 and int8["alias_gib"] == 0
    assert int8["collectives"]["all-reduce"]["count"] >= 1  # the metrics' sums over the chips
    assert "not a measurement" in proc.stdout


def _on_a_tpu(monkeypatch):
    """This process's devices seen as a TPU's, for the backend checks (no TPU needed)."""
    tpu = types.SimpleNamespace(platform="tpu")
    monkeypatch.setattr(ternary, "triton_unavailable_reason",
                        lambda: ternary.triton_unavailable_on(tpu))


def test_the_triton_backend_is_refused_on_a_tpu_before_compiling_naming_xla(monkeypatch):
    _on_a_tpu(monkeypatch)
    c = default.get_config()
    c.act_backend = "triton"
    with pytest.raises(ConfigError) as e:
        training.check_config(c, 8)
    message = str(e.value)
    assert "\n" not in message and "TPU" in message and "backend='xla'" in message
    assert message.startswith("config.act_backend='triton'")
    with pytest.raises(RuntimeError, match="not on a TPU; use backend='xla'"):
        ternary.resolve_backend("triton", jnp.bfloat16)
    c.act_backend = "fast"
    with pytest.raises(ConfigError, match="unknown backend 'fast'; choose one of auto, triton, xla"):
        training.check_model_config(c)


def test_auto_and_xla_run_the_activation_through_xla_on_a_tpu(monkeypatch):
    _on_a_tpu(monkeypatch)
    c = default.get_config()
    for backend in ("auto", "xla"):
        c.act_backend = backend
        training.check_config(c, 8)
        for dtype in (jnp.float32, jnp.bfloat16):
            assert ternary.resolve_backend(backend, dtype) == "xla"
