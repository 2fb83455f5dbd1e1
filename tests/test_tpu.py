"""What sttn-jax refuses on a TPU, checked without one."""
import types

import jax.numpy as jnp
import pytest

from configs import default
from ops import ternary
from sttn_jax import training
from sttn_jax.errors import ConfigError

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
