"""Runs survive SIGKILL (also mid-save), preemption and damaged checkpoints, and stop cleanly on a
diverged step."""
import logging
import random
import signal
import time

import jax
import numpy as np
import pytest

from sttn_jax import run_checkpoints, train_loop, training
from tests.conftest import SMOKE_RUN, latest_checkpoint, smoke_config
from tests.train_process import TrainProcess


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
    poison_batch(monkeypatch, 1)  # step 2
    cfg = smoke_config(smoke_data_dir, num_train_steps=3, checkpoint_every_steps=1, keep_checkpoints=5)
    with pytest.raises(FloatingPointError, match="at step 2: the run diverged.*last good checkpoint"):
        train_loop.train_and_evaluate(cfg, tmp_path / "stop")
    manager = run_checkpoints.checkpoint_manager(tmp_path / "stop" / "checkpoints", 5)
    assert manager.all_steps() == [1]
    # skipping instead, by config
    poison_batch(monkeypatch, 1)
    result = train_loop.train_and_evaluate(
        smoke_config(smoke_data_dir, num_train_steps=3, skip_nonfinite_steps=True), tmp_path / "skip")
    assert result["step"] == 3 and result["skipped_nonfinite_steps"] == 1
    assert np.isfinite(result["train"]["loss"])


def test_damaged_checkpoint_is_skipped_and_training_resumes_from_an_older_one(smoke_data_dir, tmp_path, caplog):
    cfg = smoke_config(smoke_data_dir, num_train_steps=2, checkpoint_every_steps=1)
    train_loop.train_and_evaluate(cfg, tmp_path)
    damaged = tmp_path / "checkpoints" / "2"
    for f in damaged.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "meta" not in f.parts:
            f.write_bytes(b"\0garbage" * 3)
    with caplog.at_level(logging.INFO, logger="sttn_jax"):
        result = train_loop.train_and_evaluate(cfg, tmp_path)  # resumes from step 1
    assert result["step"] == 2
    assert any("checkpoints/2 is unreadable" in r.getMessage() for r in caplog.records)
    assert any("resumed from" in r.getMessage() and "at step 1" in r.getMessage()
               for r in caplog.records)
    assert list((tmp_path / "unreadable_checkpoints").iterdir())
    state, _ = latest_checkpoint(tmp_path)  # step 2, trained anew, reads back
    assert int(state["step"]) == 2


def temporary_checkpoints(checkpoint_dir):
    return list(checkpoint_dir.glob("*.orbax-checkpoint-tmp*")) if checkpoint_dir.exists() else []


def kill_during_a_save(run: TrainProcess, checkpoint_dir, timeout=300) -> bool:
    """SIGKILLs `run` the moment a checkpoint directory is being written; True when the kill
    landed mid-save (the unfinished directory is still there afterwards)."""
    deadline = time.monotonic() + timeout
    while not temporary_checkpoints(checkpoint_dir):
        assert run.proc.poll() is None, f"exited before a save:\n{run.log()}"
        assert time.monotonic() < deadline, run.log()
        time.sleep(0.002)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    return bool(temporary_checkpoints(checkpoint_dir))


def test_runs_killed_at_random_moments_end_bit_identical_to_an_uninterrupted_run(
        smoke_data_dir, uninterrupted_smoke_run, tmp_path):
    """SIGKILL between and during steps, SIGKILL in the middle of a checkpoint save, SIGKILL in
    the first step after a restart, and SIGTERM (which saves first, losing no step), each
    followed by the same command: the final parameters, BatchNorm statistics and Adam moments
    equal those of one uninterrupted run bit for bit. The moments are random from a fixed seed;
    what happened is printed (pytest -s) and named in every failure message."""
    rng = random.Random(2026)
    reference, reference_dir = uninterrupted_smoke_run
    workdir = tmp_path / "killed"
    checkpoint_dir = workdir / "checkpoints"
    args = ["--config", "configs/smoke.py", "--workdir", str(workdir),
            f"--config.data_dir={smoke_data_dir}", "--config.progress_bar=False"]
    args += [f"--config.{k}={v}" for k, v in SMOKE_RUN.items()]
    total = SMOKE_RUN["num_train_steps"]
    history = []

    # 1. SIGKILL at a random moment after the first step (mid-step, mid-eval, mid-save, ...).
    run = TrainProcess(args)
    run.wait_for_line(f"step 1/{total}")
    delay = rng.uniform(0.0, 2.0)
    time.sleep(delay)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    history.append(f"SIGKILL {delay:.2f} s after step 1")

    # 2. SIGKILL in the middle of writing a checkpoint (retried if a save outran the kill).
    for attempt in range(3):
        before = run_checkpoints.checkpoint_manager(checkpoint_dir, 2).latest_step()
        run = TrainProcess(args)
        landed = kill_during_a_save(run, checkpoint_dir)
        history.append(f"SIGKILL during a save (landed: {landed}) after step {before}")
        if landed:
            break
    assert landed, history
    # the unfinished save is invisible: the newest checkpoint is still the last complete one
    assert run_checkpoints.checkpoint_manager(checkpoint_dir, 2).latest_step() == before, history

    # 3. SIGKILL at a random moment of the first step after a restart (its compile and run).
    run = TrainProcess(args)
    run.wait_for_line("training resnet18_bwx2 on")
    delay = rng.uniform(0.0, 3.0)
    time.sleep(delay)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    history.append(f"SIGKILL {delay:.2f} s into the first step after a restart")

    # 4. SIGTERM after a random later step: saves that step, exits 143 (what schedulers expect).
    resumed_from = run_checkpoints.checkpoint_manager(checkpoint_dir, 2).latest_step() or 0
    assert resumed_from <= total - 2, history
    term_after = rng.randint(resumed_from + 1, total - 1)
    run = TrainProcess(args)
    run.wait_for_line(f"step {term_after}/{total}")
    assert run.signal(signal.SIGTERM) == 143, run.log()
    saved = [ln for ln in run.lines if "SIGTERM at step" in ln]
    assert saved, run.log()
    step = int(saved[0].split("SIGTERM at step ")[1].split(":")[0])
    assert step >= term_after
    assert run_checkpoints.checkpoint_manager(checkpoint_dir, 2).latest_step() == step  # no step lost
    history.append(f"SIGTERM after step {term_after}, saved step {step}")

    # 5. The same command once more runs to the end.
    run = TrainProcess(args)
    assert run.finish() == 0, run.log()
    assert any(f"at step {step}" in ln and "resumed from" in ln for ln in run.lines), run.log()
    assert not temporary_checkpoints(checkpoint_dir), "leftover unfinished saves were not cleaned up"

    state, meta = latest_checkpoint(workdir)
    expected, expected_meta = latest_checkpoint(reference_dir)
    assert int(state["step"]) == int(expected["step"]) == total, history
    leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert len(leaves) == len(jax.tree_util.tree_leaves(state))
    for (path, want), got in zip(leaves, jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(got, want, err_msg=f"{jax.tree_util.keystr(path)}; {history}")
    assert meta["best_top1"] == expected_meta["best_top1"] == reference["best_top1"]
    print("interruptions:", "; ".join(history))
