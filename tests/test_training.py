"""Training: smoke run on 8 simulated devices, data-parallel exactness, learning, resume."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sttn_jax import models, preflight, run_checkpoints, train_loop, training
from tests.conftest import assert_float64_runs_agree, latest_checkpoint, smoke_config


def test_smoke_run_on_8_devices(uninterrupted_smoke_run):
    """The smoke config trains, evaluates and checkpoints on 8 devices. (That a resumed run ends
    exactly like this one is test_reliability's kill-and-rerun test.)"""
    assert jax.device_count() == 8
    result, workdir = uninterrupted_smoke_run
    assert result["step"] == 6
    assert result["eval"]["num_examples"] == 8 and 0 <= result["eval"]["top1"] <= 1
    assert np.isfinite(result["train"]["loss"])
    assert 0 < result["train"]["ternary_zero_fraction"] < 1
    assert (workdir / "best").is_dir() and list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 6
    state, meta = latest_checkpoint(workdir)
    assert int(state["step"]) == 6 and meta["best_top1"] == result["best_top1"]
    assert run_checkpoints.checkpoint_manager(workdir / "checkpoints", 2).all_steps() == [5, 6]


def fixed_batch(n=16, size=32, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    images = rng.normal(size=(n, size, size, 3)) * 0.5
    images[:, :8, :8, :] += labels[:, None, None, None] / 3.0  # learnable signal
    return {"image": images.astype(np.float32), "label": labels.astype(np.int32)}


def make_trainer(devices, dtype="float32", **overrides):
    from configs import default

    c = default.get_config()
    c.num_classes = 10
    c.image_size = 32
    c.dtype = dtype
    c.num_epochs = 4
    for k, v in overrides.items():
        c[k] = v
    return training.Trainer(c, steps_per_epoch=10, mesh=training.make_mesh(devices))


def test_8_devices_equal_1_device_float64(x64):
    """Data parallelism (shard_map, global-mean loss, synchronised BatchNorm, Adam) changes nothing.

    Run on the merged ternary architecture: with the bwx2 pairs, ternary activations times ternary
    kernels make every convolution output discrete, and in stride-2 blocks the zero-padded shortcut
    channels feed such outputs (after BatchNorm) straight into PReLU: whenever a batch mean lands
    exactly on a sample, a PReLU input is exactly 0, and the summation order alone (one mean vs a
    pmean of eight) picks which side of the kink it is on (investigated: both derivatives are
    valid; which device count disagrees is a rounding lottery). The ternary model has continuous
    kernels, so no value sits on a kink and the comparison can be exact to rounding."""
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 32, 32, 3)), "label": (np.arange(16) % 10).astype(np.int32)}
    variables = models.init_variables(models.create("resnet18_ter", 10), jax.random.PRNGKey(0), 32)
    variables = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, variables)
    finals = []
    for devices in (jax.devices()[:1], jax.devices()):
        tr = make_trainer(devices, "float64", sync_batch_stats=True, arch="resnet18_ter")
        state = tr.state_from_variables(variables)
        losses, first_mu = [], None
        for _ in range(3):
            state, metrics = tr.train_step(state, tr.shard_batch(batch), None)
            losses.append(float(metrics["loss"]))
            first_mu = jax.device_get(state.opt_state[0].mu) if first_mu is None else first_mu
        finals.append((jax.device_get(state), losses, first_mu))
    (one, loss1, mu1), (eight, loss8, mu8) = finals
    assert len(jax.devices()) == 8
    # the first step's gradient (Adam's first moment = 0.1 * gradient), leaf by leaf
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(mu1), jax.tree_util.tree_leaves(mu8)):
        key = jax.tree_util.keystr(path)
        atol = 1e-14 if ("conv" in key and key.endswith("['bias']")) else 1e-12 * np.abs(a).max()
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=atol, err_msg=key)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-12)
    assert int(one.step) == int(eight.step) == 3
    worst = assert_float64_runs_agree(one, eight)
    print(f"8 devices vs 1: worst relative difference {worst:.2e}")


def test_loss_decreases_on_a_fixed_batch():
    tr = make_trainer(jax.devices()[:2], learning_rate=0.005)
    state = tr.init_state(jax.random.PRNGKey(1))
    batch = tr.shard_batch(fixed_batch(16))
    losses = []
    for _ in range(20):
        state, metrics = tr.train_step(state, batch, None)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    # the clamp persists: every latent kernel is within [-1, 1] after a step
    for path in ("features_8",):
        k = state.params[path]["conv1"]["kernel_1"]
        assert float(jnp.abs(k).max()) <= 1.0


def test_cosine_per_epoch_schedule_is_the_original():
    sched = training.cosine_per_epoch(0.005, 256, steps_per_epoch=10)
    for step, epoch in [(0, 0), (9, 0), (10, 1), (2555, 255)]:
        want = 0.5 * 0.005 * (1 + np.cos(np.pi * epoch / 256))
        assert float(sched(step)) == pytest.approx(want, rel=1e-6, abs=1e-9)  # float32 cos near pi


def test_distillation_loss_is_the_original_ts_loss():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    p = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    logq = s - np.log(np.exp(s).sum(1, keepdims=True))
    want = -(p * logq).sum(1).mean()
    assert float(training.distillation_loss(jnp.asarray(s), jnp.asarray(t))) == pytest.approx(want, rel=1e-5)


def test_bad_config_values_are_refused_with_the_fix(smoke_data_dir, tmp_path):
    bad = [({"batch_size": 12}, "not divisible by the 8 devices"),
           ({"image_size": 16, "resize_size": 18}, "at least 32"),
           ({"dtype": "float16"}, "choose one of"),
           ({"teacher_checkpoint": str(tmp_path / "missing.pth")}, "does not exist")]
    for overrides, message in bad:
        with pytest.raises(preflight.ConfigError, match=message):
            train_loop.train_and_evaluate(smoke_config(smoke_data_dir, **overrides), tmp_path / "w")


def test_train_cli_refuses_unknown_config_keys_and_bad_values(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run = lambda *args: subprocess.run([sys.executable, "train.py", "--config", "configs/smoke.py",  # noqa: E731
                                        "--workdir", str(tmp_path / "w"), *args],
                                       cwd=repo, capture_output=True, text=True, timeout=300)
    r = run("--config.bogus_key=3")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown config key 'bogus_key'") and "batch_size" in last
    assert "Traceback" not in r.stderr
    r = run("--config.batch_size=abc")
    assert r.returncode != 0 and "batch_size" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
