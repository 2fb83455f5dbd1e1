"""Multi-process training: two processes (jax.distributed on localhost, Gloo CPU collectives,
4 simulated devices each), one of them preempted on the way, train exactly what one process with
8 devices trains."""
import json
import os
import signal
import socket
import threading
from pathlib import Path

import jax
import numpy as np

from sttn_jax import run_checkpoints, train_loop, training
from tests.conftest import assert_float64_runs_agree, smoke_config
from tests.train_process import TrainProcess

STEPS = 3  # one epoch
OVERRIDES = dict(arch="resnet18_ter", dtype="float64", data_shards=2, num_train_steps=STEPS,
                 checkpoint_every_steps=100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_two(workdir: Path, data_dir: str) -> list[TrainProcess]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_ENABLE_X64="1")
    args = ["--config", "configs/smoke.py", "--workdir", str(workdir),
            f"--config.data_dir={data_dir}", "--config.progress_bar=False",
            f"--coordinator_address=localhost:{free_port()}", "--num_processes=2"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return [TrainProcess(args + [f"--process_id={i}"], env=env) for i in range(2)]


def final_state(workdir: Path, config):
    trainer = training.Trainer(config, steps_per_epoch=3, mesh=training.make_mesh())
    manager = run_checkpoints.checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints)
    state, meta = run_checkpoints.restore(manager, trainer)
    return jax.device_get(state), meta


def test_two_processes_one_preempted_train_like_one_process_with_eight_devices(
        smoke_data_dir, tmp_path, x64):
    """SIGTERM reaches process 1 only, after its first step: JAX's preemption service tells
    process 0, both save the same step and exit 143; the same two commands again finish the run.
    Same global batches (data_shards=2: the stream does not depend on the process count), same
    synchronised BatchNorm and gradient means, so the same parameters as one process with 8
    devices, in float64 up to summation order (Gloo's all-reduce vs one process's).
    resnet18_ter: see test_training.test_8_devices_equal_1_device_float64."""
    workdir = tmp_path / "two"
    procs = launch_two(workdir, smoke_data_dir)
    sent = []

    def preempt_process_1():
        try:
            procs[1].wait_for_line(f"step 1/{STEPS}")
            procs[1].proc.send_signal(signal.SIGTERM)
            sent.append(True)
        except AssertionError as e:
            sent.append(e)

    watcher = threading.Thread(target=preempt_process_1)
    watcher.start()
    try:
        config = smoke_config(smoke_data_dir, **OVERRIDES)
        one = train_loop.train_and_evaluate(config, tmp_path / "one")  # meanwhile, 8 devices here
        watcher.join(timeout=600)
        codes = [p.finish(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
    assert sent == [True], sent
    assert codes == [143, 143], "\n".join(p.log() for p in procs)
    saved = [[int(ln.split("SIGTERM at step ")[1].split(":")[0]) for ln in p.lines
              if "SIGTERM at step" in ln] for p in procs]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved  # both stopped, at the same step
    stopped_at = saved[0][0]
    assert 1 <= stopped_at < STEPS
    assert run_checkpoints.checkpoint_manager(workdir / "checkpoints", 2).latest_step() == stopped_at

    procs = launch_two(workdir, smoke_data_dir)
    codes = [p.finish(timeout=600) for p in procs]
    assert codes == [0, 0], "\n".join(p.log() for p in procs)
    for p in procs:
        assert any(f"at step {stopped_at}" in ln and "resumed from" in ln for ln in p.lines), p.log()
        assert any("global batch 8 over 8 devices" in ln for ln in p.lines), p.log()
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
    print(f"two processes vs one: worst relative difference {worst:.2e} (SIGTERM at step {stopped_at})")
