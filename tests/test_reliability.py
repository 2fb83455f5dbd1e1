"""Runs survive preemption and damaged checkpoints, and stop cleanly on a diverged step."""
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sttn_jax import train_loop, training
from tests.conftest import smoke_config

REPO = Path(__file__).resolve().parents[1]


def test_a_nonfinite_step_changes_nothing_but_the_step_counter():
    from configs import default

    c = default.get_config()
    c.arch, c.num_classes, c.image_size = "resnet18_ter", 10, 32
    tr = training.Trainer(c, steps_per_epoch=10, mesh=training.make_mesh(jax.devices()[:2]))
    state = tr.init_state(jax.random.PRNGKey(0))
    before = jax.device_get(state)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    images[1, 3, 3, 0] = np.nan
    state, metrics = tr.train_step(state, tr.shard_batch({"image": images, "label": np.zeros(4, np.int32)}), None)
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after.step) == int(before.step) + 1
    for a, b in zip(jax.tree_util.tree_leaves((before.params, before.batch_stats, before.opt_state)),
                    jax.tree_util.tree_leaves((after.params, after.batch_stats, after.opt_state))):
        np.testing.assert_array_equal(a, b)


def poison_batch(monkeypatch, index):
    """Makes the `index`-th training batch (0-based, over the run) NaN."""
    orig = train_loop._prefetch
    seen = {"n": 0}

    def poisoned(batches):
        for b in batches:
            if seen["n"] == index:
                b = dict(b, image=np.full_like(b["image"], np.nan))
            seen["n"] += 1
            yield b

    monkeypatch.setattr(train_loop, "_prefetch", lambda trainer, batches, depth=2: orig(trainer, poisoned(batches)))


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(smoke_data_dir, tmp_path, monkeypatch):
    poison_batch(monkeypatch, 2)  # step 3
    cfg = smoke_config(smoke_data_dir, num_train_steps=5, checkpoint_every_steps=1, keep_checkpoints=5)
    with pytest.raises(FloatingPointError, match="at step 3: the run diverged.*last good checkpoint"):
        train_loop.train_and_evaluate(cfg, tmp_path / "stop")
    manager = train_loop.checkpoint_manager(tmp_path / "stop" / "checkpoints", 5)
    assert manager.latest_step() == 2
    # skipping instead, by config
    poison_batch(monkeypatch, 2)
    result = train_loop.train_and_evaluate(
        smoke_config(smoke_data_dir, num_train_steps=4, skip_nonfinite_steps=True), tmp_path / "skip")
    assert result["step"] == 4 and result["skipped_nonfinite_steps"] == 1
    assert np.isfinite(result["train"]["loss"])


def test_damaged_checkpoint_is_skipped_and_training_resumes_from_an_older_one(smoke_data_dir, tmp_path, caplog):
    cfg = smoke_config(smoke_data_dir, num_train_steps=2, checkpoint_every_steps=1)
    train_loop.train_and_evaluate(cfg, tmp_path)
    damaged = tmp_path / "checkpoints" / "2"
    for f in damaged.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "meta" not in f.parts:
            f.write_bytes(b"\0garbage" * 3)
    with caplog.at_level(logging.WARNING, logger="sttn_jax"):
        result = train_loop.train_and_evaluate(smoke_config(smoke_data_dir, num_train_steps=3,
                                                            checkpoint_every_steps=1), tmp_path)
    assert result["step"] == 3
    assert any("checkpoints/2 is unreadable" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "unreadable_checkpoints").iterdir())
    assert train_loop.checkpoint_manager(tmp_path / "checkpoints", 2).latest_step() == 3


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_without_losing_a_step(smoke_data_dir, tmp_path):
    workdir = tmp_path / "w"
    args = [sys.executable, "train.py", "--config", "configs/smoke.py", "--workdir", str(workdir),
            f"--config.data_dir={smoke_data_dir}", "--config.progress_bar=False",
            "--config.num_train_steps=6", "--config.checkpoint_every_steps=100"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "step 1/6" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    lines += rest.splitlines()
    assert proc.returncode == 143, "".join(lines[-20:])
    saved = [ln for ln in lines if "SIGTERM at step" in ln]
    assert saved, "".join(lines[-20:])
    step = int(saved[0].split("SIGTERM at step ")[1].split(":")[0])
    assert step >= 1
    manager = train_loop.checkpoint_manager(workdir / "checkpoints", 3)
    assert manager.latest_step() == step
    result = train_loop.train_and_evaluate(smoke_config(smoke_data_dir, num_train_steps=6), workdir)
    assert result["step"] == 6
