"""Runs survive SIGKILL (also mid-save), preemption and damaged checkpoints, and end exactly like
an uninterrupted run."""
import logging
import os
import random
import signal
import time

import jax
import numpy as np
import pytest

from sttn_jax import checkpoints, train_loop
from tests.conftest import SMOKE_RUN, latest_checkpoint, smoke_config
from tests.train_process import TrainProcess


def test_damaged_checkpoint_is_skipped_and_training_resumes_from_an_older_one(smoke_data_dir, tmp_path, caplog):
    cfg = smoke_config(smoke_data_dir, num_train_steps=2, checkpoint_every_steps=1)
    train_loop.train_and_evaluate(cfg, tmp_path)
    damaged = tmp_path / "checkpoints" / "2"
    for f in damaged.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "meta" not in f.parts:
            f.write_bytes(b"\0garbage" * 3)
    # as if killed after its last save: a finished run (final metrics written) is not run again
    (tmp_path / train_loop.FINAL_METRICS).unlink()
    with caplog.at_level(logging.INFO, logger="absl"):
        result = train_loop.train_and_evaluate(cfg, tmp_path)  # resumes from step 1
    assert result["step"] == 2
    assert any("checkpoints/2 is unreadable" in r.getMessage() for r in caplog.records)
    assert any("resumed from" in r.getMessage() and "at step 1" in r.getMessage()
               for r in caplog.records)
    assert list((tmp_path / "unreadable_checkpoints").iterdir())
    state, _ = latest_checkpoint(tmp_path)  # step 2, trained anew, reads back
    assert int(state["step"]) == 2


def temporary_checkpoints(checkpoint_dir):
    """The unfinished saves in `checkpoint_dir`, as (name, inode): a save of the same step by
    another run reuses the name, not the directory."""
    if not checkpoint_dir.exists():
        return []
    found = []
    for p in checkpoint_dir.glob("*.orbax-checkpoint-tmp*"):
        try:
            found.append((p.name, p.stat().st_ino))
        except FileNotFoundError:  # finalized (renamed) or cleaned up meanwhile
            pass
    return found


def kill_during_a_save(args, env, checkpoint_dir, timeout=300):
    """Starts train.py and SIGKILLs it the moment it writes a checkpoint (a temporary directory
    that an earlier killed run did not leave). Returns (the run, whether the kill landed mid-save:
    that directory is still there afterwards)."""
    stale = set(temporary_checkpoints(checkpoint_dir))
    run = TrainProcess(args, env)
    deadline = time.monotonic() + timeout
    while not set(temporary_checkpoints(checkpoint_dir)) - stale:
        assert run.proc.poll() is None, f"exited before a save:\n{run.log()}"
        assert time.monotonic() < deadline, run.log()
        time.sleep(0.002)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    return run, bool(set(temporary_checkpoints(checkpoint_dir)) - stale)


@pytest.mark.long
def test_runs_killed_at_random_moments_end_bit_identical_to_an_uninterrupted_run(
        smoke_data_dir, uninterrupted_smoke_run, tmp_path):
    """Two concurrent starts (one refused), SIGKILL between and during steps, SIGKILL in the
    middle of a checkpoint save, SIGKILL in the first step after a restart, and SIGTERM (which
    saves first, losing no step), each followed by the same command: the final parameters, BatchNorm statistics and Adam moments
    equal those of one uninterrupted run bit for bit. The moments are random from a fixed seed;
    what happened is printed (pytest -s) and named in every failure message. The killed runs
    leave nothing in the temporary directory either."""
    rng = random.Random(2026)
    temporary = tmp_path / "tmp"  # every run's TMPDIR
    temporary.mkdir()
    env = dict(os.environ, TMPDIR=str(temporary))
    reference, reference_dir = uninterrupted_smoke_run
    workdir = tmp_path / "killed"
    checkpoint_dir = workdir / "checkpoints"
    args = ["--config", "configs/smoke.py", "--workdir", str(workdir),
            f"--config.data_dir={smoke_data_dir}", "--config.progress_bar=False"]
    args += [f"--config.{k}={v}" for k, v in SMOKE_RUN.items()]
    total = SMOKE_RUN["num_train_steps"]
    history = []

    # 1. Two starts at once on one workdir (a scheduler restarting a job whose old process still
    # runs): one is refused in one line naming the holder, the other trains; SIGKILL it at a
    # random moment after its first step (mid-step, mid-eval, mid-save, ...).
    runs = [TrainProcess(args, env), TrainProcess(args, env)]
    deadline = time.monotonic() + 300
    while all(r.proc.poll() is None for r in runs):
        assert time.monotonic() < deadline, "neither start was refused"
        time.sleep(0.05)
    refused_run = next(r for r in runs if r.proc.poll() is not None)
    run = next(r for r in runs if r is not refused_run)
    assert refused_run.finish() == 2, refused_run.log()
    assert f"is in use by the run of pid {run.proc.pid} on host" in refused_run.lines[-1], \
        refused_run.log()
    run.wait_for_line(f"step 1/{total}")
    delay = rng.uniform(0.0, 2.0)
    time.sleep(delay)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    history.append(f"two starts, one refused; SIGKILL {delay:.2f} s after step 1")

    # 2. SIGKILL in the middle of writing a checkpoint (retried if a save outran the kill). The
    # lock the killed run left is taken over.
    for attempt in range(3):
        before = checkpoints.manager(checkpoint_dir, 2, read_only=True).latest_step()
        run, landed = kill_during_a_save(args, env, checkpoint_dir)
        assert any("taking over the lock" in line for line in run.lines), run.log()
        history.append(f"SIGKILL during a save (landed: {landed}) after step {before}")
        if landed:
            break
    assert landed, history
    # the unfinished save is invisible: the newest checkpoint is still the last complete one
    assert checkpoints.manager(checkpoint_dir, 2, read_only=True).latest_step() == before, history

    # 3. SIGKILL at a random moment of the first step after a restart (its compile and run).
    run = TrainProcess(args, env)
    run.wait_for_line("training resnet18_bwx2 on")
    delay = rng.uniform(0.0, 3.0)
    time.sleep(delay)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    history.append(f"SIGKILL {delay:.2f} s into the first step after a restart")

    # 4. SIGTERM after a random later step: saves that step, exits 143 (what schedulers expect).
    resumed_from = checkpoints.manager(checkpoint_dir, 2, read_only=True).latest_step() or 0
    assert resumed_from <= total - 2, history
    term_after = rng.randint(resumed_from + 1, total - 1)
    run = TrainProcess(args, env)
    run.wait_for_line(f"step {term_after}/{total}")
    assert run.signal(signal.SIGTERM) == 143, run.log()
    saved = [ln for ln in run.lines if "SIGTERM at step" in ln]
    assert saved, run.log()
    step = int(saved[0].split("SIGTERM at step ")[1].split(":")[0])
    assert step >= term_after
    assert checkpoints.manager(checkpoint_dir, 2, read_only=True).latest_step() == step  # no step lost
    history.append(f"SIGTERM after step {term_after}, saved step {step}")

    # 5. The same command once more runs to the end.
    run = TrainProcess(args, env)
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
    left = sorted(p.name for p in temporary.iterdir())
    assert not left, f"left in TMPDIR: {left}; {history}"
    print("interruptions:", "; ".join(history))

