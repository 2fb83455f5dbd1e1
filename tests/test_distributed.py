"""Multi-process training: two processes (jax.distributed on localhost, Gloo CPU collectives,
4 simulated devices each), one of them preempted, then one killed, then the newest checkpoint
damaged, train exactly what one process with 8 devices trains."""
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from sttn_jax import checkpoints, train_loop, training
from tests.conftest import REPO, assert_float64_runs_agree, assert_one_error_line, smoke_config
from tests.train_process import TrainProcess

STEPS = 3  # one epoch
OVERRIDES = dict(arch="resnet18_ter", dtype="float64", data_shards=2, num_train_steps=STEPS,
                 checkpoint_every_steps=1)
HEARTBEAT = 10  # s, not the default 30: a shorter wait if the kill is noticed by heartbeats
DEFAULT_HEARTBEAT = 30  # s, --heartbeat_timeout_seconds' default (sttn_jax/cli.py)
LATE = 45  # s a process is held before its first step: more than XLA's 30 s for Gloo to meet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_two(workdir: Path, data_dir: str, heartbeat=HEARTBEAT) -> list[TrainProcess]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_ENABLE_X64="1",
               JAX_LOG_COMPILES="1")  # for the check that saving compiles nothing
    args = ["--config", "configs/smoke.py", "--workdir", str(workdir),
            f"--config.data_dir={data_dir}", "--config.progress_bar=False",
            f"--coordinator_address=localhost:{free_port()}", "--num_processes=2",
            f"--heartbeat_timeout_seconds={heartbeat}"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return [TrainProcess(args + [f"--process_id={i}"], env=env) for i in range(2)]


def final_state(workdir: Path, config):
    mesh = training.make_mesh()
    tx = training.create_optimizer(config, training.learning_rate_fn(config, 3))
    manager = checkpoints.manager(workdir / checkpoints.LATEST, config.keep_checkpoints)
    state, meta = checkpoints.restore(manager, training.abstract_train_state(config, mesh, tx))
    return jax.device_get(state), meta


def wait_for_checkpoint(directory: Path, step: int, procs, timeout=300) -> None:
    """Blocks until `directory` holds the finished checkpoint of `step`."""
    deadline = time.monotonic() + timeout
    while step not in checkpoints.steps(directory):
        assert all(p.proc.poll() is None for p in procs), "\n".join(p.log() for p in procs)
        assert time.monotonic() < deadline, "\n".join(p.log() for p in procs)
        time.sleep(0.01)


def damage(step_dir: Path) -> None:
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "meta" not in f.parts:
            f.write_bytes(b"\0garbage" * 3)


@pytest.mark.long
def test_two_processes_preempted_killed_and_damaged_train_like_one_process_with_eight_devices(
        smoke_data_dir, tmp_path, x64):
    """Three launches of the same two commands, then the result of one process with 8 devices.

    1. SIGTERM reaches process 1 only, before its first step: JAX's preemption service tells
       process 0, both save step 1 and exit 143.
    2. Both resume; process 1 is SIGKILLed as soon as step 2 is saved. Process 0 stops within
       the heartbeat timeout, its stderr naming the process it lost: at once when the kill
       breaks a collective under way (what happens here, mostly), else when the runtime aborts
       it (test_a_process_lost_outside_a_collective_aborts_the_others_naming_it).
    3. Step 2, the newest checkpoint, is damaged: process 0 moves it aside, both resume from
       step 1 and finish, though process 1 is held (SIGSTOP) for LATE s before its first step:
       process 0 loads that step from the compilation cache (only process 0 writes it) and waits
       (processes.first_call_together; the first run of the step's collectives would give it
       30 s). Meanwhile this process trains the same config with 8 devices, the reference.
    Same global batches (data_shards=2: the stream does not depend on the process count), same
    synchronised BatchNorm and gradient means, so the same parameters as one process with 8
    devices, in float64 up to summation order (Gloo's all-reduce vs one process's).
    resnet18_ter: see test_training.test_8_devices_equal_1_device_float64."""
    workdir = tmp_path / "two"
    checkpoint_dir = workdir / checkpoints.LATEST
    times = {}
    started = time.monotonic()
    procs = launch_two(workdir, smoke_data_dir)
    try:
        procs[1].wait_for_line("training resnet18_ter on")
        procs[1].proc.send_signal(signal.SIGTERM)
        codes = [p.finish(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
    times["1: preempted"] = time.monotonic() - started
    assert codes == [143, 143], "\n".join(p.log() for p in procs)
    saved = [[int(ln.split("SIGTERM at step ")[1].split(":")[0]) for ln in p.lines
              if "SIGTERM at step" in ln] for p in procs]
    assert saved == [[1], [1]], saved  # both stopped at the first step after the notice
    assert checkpoints.steps(checkpoint_dir) == [1]

    started = time.monotonic()
    procs = launch_two(workdir, smoke_data_dir)
    try:
        wait_for_checkpoint(checkpoint_dir, 2, procs)
        procs[1].proc.kill()
        killed = time.monotonic()
        # the bound: the heartbeat timeout, plus a whole launch as this machine runs it now
        # (launch 1: start, compile, a step, a save) for the step in progress and the exit
        code = procs[0].finish(timeout=HEARTBEAT + times["1: preempted"])
        noticed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
    times["2: killed"] = time.monotonic() - started
    assert procs[1].finish() == -signal.SIGKILL
    # Where process 0 was decides how it learns (see cli.init_distributed): a collective that
    # fails at once (exit status 1), or the runtime's abort after the heartbeat timeout.
    assert code in (1, -signal.SIGABRT), procs[0].log()
    if code == 1:  # the collective's error: one line, before Python would print a traceback
        last = procs[0].lines[-1]
        assert last.startswith("error: lost contact with another process (in a collective: Gloo")
        assert "run the same command on every host to resume" in last, procs[0].log()
        assert sum(ln.startswith("error:") for ln in procs[0].lines) == 1, procs[0].log()
        assert not any("Traceback" in ln for ln in procs[0].lines), procs[0].log()
    else:  # JAX's runtime aborted it, naming the task that stopped sending heartbeats
        assert any("heartbeat" in ln for ln in procs[0].lines), procs[0].log(n=200)
    assert checkpoints.steps(checkpoint_dir) == [1, 2]

    started = time.monotonic()
    damage(checkpoint_dir / "2")
    procs = launch_two(workdir, smoke_data_dir, heartbeat=2 * LATE)  # a held process is alive
    resume = threading.Timer(LATE, procs[1].proc.send_signal, (signal.SIGCONT,))
    try:
        procs[1].wait_for_line("training resnet18_ter on")
        procs[1].proc.send_signal(signal.SIGSTOP)
        resume.start()
        config = smoke_config(smoke_data_dir, **OVERRIDES)
        one = train_loop.train_and_evaluate(config, tmp_path / "one")  # meanwhile, 8 devices here
        resume.join()
        codes = [p.finish(timeout=600) for p in procs]
    finally:
        resume.cancel()
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
    times["3: resumed from the older checkpoint (and one process)"] = time.monotonic() - started
    assert codes == [0, 0], "\n".join(p.log() for p in procs)
    assert any("checkpoints/2 is unreadable" in ln for ln in procs[0].lines), procs[0].log()
    assert [d.name.split("-")[0] for d in (workdir / "unreadable_checkpoints").iterdir()] == ["2"]
    for p in procs:
        assert any("at step 1" in ln and "resumed from" in ln for ln in p.lines), p.log()
        assert any("global batch 8 over 8 devices" in ln for ln in p.lines), p.log()
        # checkpoints are written from a host copy by process 0: no replica-parallel writing,
        # which compiles a slice program per array shape in every process
        compiled = [ln for ln in p.lines if "Finished XLA compilation of" in ln]
        # the train and the eval step, each compiled once (first_call_together compiles ahead)
        assert sum("jit(step_fn)" in ln for ln in compiled) == 2, "".join(compiled)
        assert not [ln for ln in compiled if "jit(slice)" in ln], p.log()

    two = json.loads((workdir / "final_metrics.json").read_text())
    assert two["step"] == one["step"] == STEPS
    np.testing.assert_allclose(two["train"]["loss"], one["train"]["loss"], rtol=1e-10)
    assert two["eval"]["num_examples"] == one["eval"]["num_examples"] == 8
    np.testing.assert_allclose(two["eval"]["loss"], one["eval"]["loss"], rtol=1e-10)
    (state_one, meta_one), (state_two, meta_two) = (final_state(tmp_path / "one", config),
                                                    final_state(workdir, config))
    assert int(state_one.step) == int(state_two.step) == STEPS
    assert meta_one["best_top1"] == meta_two["best_top1"]
    worst = assert_float64_runs_agree(state_one, state_two)
    print(f"two processes vs one: worst relative difference {worst:.2e}; process 0 stopped "
          f"{noticed:.1f} s after process 1's SIGKILL (exit status {code});",
          "; ".join(f"{k} {v:.0f} s" for k, v in times.items()))


def test_a_process_lost_outside_a_collective_aborts_the_others_naming_it():
    """A process SIGKILLed while no collective is under way: nothing fails at once, JAX's
    coordination service (in process 0) misses its heartbeats for --heartbeat_timeout_seconds and
    aborts every other process (SIGABRT), stderr naming the task that went silent. It stops before
    the default timeout would have run out: the tools pass the flag on (JAX's own default is 100 s,
    ours DEFAULT_HEARTBEAT). No other bound: the abort follows the timeout by what the service's
    check interval and this machine's load make it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [f"--coordinator_address=localhost:{free_port()}", "--num_processes=2",
            f"--heartbeat_timeout_seconds={HEARTBEAT}"]
    procs = [TrainProcess(args + [f"--process_id={i}"], env=env, script="tests/idle_process.py")
             for i in range(2)]
    try:
        for p in procs:
            p.wait_for_line("joined", timeout=120)
        procs[1].proc.kill()
        killed = time.monotonic()
        code = procs[0].finish(timeout=120)
        noticed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
    assert code == -signal.SIGABRT, procs[0].log(n=200)
    assert re.search(r"stopped sending heartbeats\):\s+1\n", "".join(procs[0].lines)), \
        procs[0].log(n=200)
    assert noticed < DEFAULT_HEARTBEAT, \
        f"process 0 stopped {noticed:.1f} s after process 1's SIGKILL"


def test_processes_that_do_not_share_the_workdir_are_refused_in_one_line(tmp_path):
    """Two processes with different --workdirs, as with a workdir on each host's own disk (process
    0 writes the checkpoints; the others could not resume from them): both stop before training,
    with one line naming the process that does not see process 0's lock file and the fix."""
    args = ["--config", "configs/smoke.py", "--config.progress_bar=False",
            f"--coordinator_address=localhost:{free_port()}", "--num_processes=2",
            f"--heartbeat_timeout_seconds={HEARTBEAT}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [TrainProcess(args + [f"--process_id={i}", "--workdir", str(tmp_path / f"host{i}")],
                          env=env) for i in range(2)]
    try:
        codes = [p.finish(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
    for p, code in zip(procs, codes):
        line = assert_one_error_line(SimpleNamespace(returncode=code, stderr="".join(p.lines)))
        assert "is not one directory shared by every process: process(es) 1 do not see" in line
        assert "same --workdir on a filesystem that all hosts share" in line
    for i in range(2):
        assert sorted(f.name for f in (tmp_path / f"host{i}").iterdir()) == [], i
