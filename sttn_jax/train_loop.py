"""`train_and_evaluate(config, workdir)`: the whole training run, resumable.

The workdir holds `checkpoints/` (the last k steps) and `best/` (the best top-1 so far), both
written by `run_checkpoints`, `tensorboard/` event files, `config.json` and, at the end,
`final_metrics.json`. Before the first step, `preflight` refuses bad input. Running the same
command on the workdir of an interrupted run (killed, preempted, out of disk) resumes exactly: the
state (step, parameters, Adam moments, BatchNorm statistics) comes from the newest complete
checkpoint, and the data stream is a pure function of (seed, epoch, data_shards) from which the
batches already seen in the epoch are skipped.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import jax

from sttn_jax import data, training
from sttn_jax.preflight import (ConfigError, check_checkpoint_space, check_data,
                                check_workdir_writable, data_dir, load_teacher, prepare_data,
                                validate_config)
from sttn_jax.run_checkpoints import checkpoint_manager, restore_newest_good, save

log = logging.getLogger("sttn_jax")


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the current step was saved before stopping."""


class _Progress:
    """A tqdm bar with ETA and live loss / top-1 / images per second (process 0 only)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            desc="train")

    def update(self, n: int, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, line: str):
        if self.bar is not None:
            self.bar.write(line)
        log.info(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _Tensorboard:
    def __init__(self, workdir: Path):
        self.writer = None
        if jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard event files")
                return
            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def scalars(self, step: int, values: dict, prefix: str):
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def train_and_evaluate(config, workdir) -> dict:
    """Trains (or resumes) in `workdir`; returns the final metrics
    {"step", "train": {...}, "eval": {...} or None, "best_top1"}."""
    workdir = Path(workdir)
    mesh = training.make_mesh()
    validate_config(config, mesh.devices.size)
    check_workdir_writable(workdir)
    prepare_data(config)
    check_data(config)
    process_count = jax.process_count()
    per_process_batch = config.batch_size // process_count
    try:
        num_shards = data.check_num_shards(config.data_shards, process_count, config.batch_size)
    except ValueError as e:
        raise ConfigError(f"config.data_shards: {e}") from None
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.train_split, config.batch_size,
                                           data_dir(config), num_shards=num_shards)
    if steps_per_epoch == 0:
        n = data.num_examples(config.dataset, config.train_split, data_dir(config))
        raise ConfigError(f"the {config.train_split} split has {n} examples, fewer than one batch "
                          f"of {config.batch_size}; lower --config.batch_size")
    total_steps = training.steps_from_epochs(config, steps_per_epoch)
    teacher = load_teacher(config) if config.teacher_checkpoint else None
    trainer = training.Trainer(config, steps_per_epoch, mesh, teacher_variables=teacher)
    check_checkpoint_space(workdir, trainer.abstract_state())

    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    manager = checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints)
    best_manager = checkpoint_manager(workdir / "best", 1)
    meta = {"arch": config.arch, "best_top1": None, "eval": None}
    restored = restore_newest_good(manager, trainer)
    if restored is not None:
        state, meta = restored
        log.info("resumed from %s at step %d", workdir / "checkpoints", int(state.step))
    else:
        state = trainer.init_state(jax.random.PRNGKey(config.seed))
    step = int(jax.device_get(state.step))

    progress = _Progress(config.progress_bar, total_steps, step)
    tb = _Tensorboard(workdir)
    progress.write(f"training {config.arch} on {config.dataset}: {total_steps} steps "
                   f"({steps_per_epoch} per epoch), global batch {config.batch_size} over "
                   f"{mesh.devices.size} devices, workdir {workdir}")
    last_train = {}
    nonfinite = _NonFiniteWatch(config, workdir)
    term = _TermSignal()
    try:
        window_start, window_images = time.perf_counter(), 0
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            ds = data.make_dataset(
                config.dataset, config.train_split, batch_size=per_process_batch, train=True,
                image_size=config.image_size, resize_size=config.resize_size, seed=config.seed,
                epoch=epoch, data_dir=data_dir(config), skip_batches=skip,
                shuffle_buffer=config.shuffle_buffer, random_flip=config.random_flip,
                num_shards=num_shards)
            for batch in _prefetch(trainer, ds.as_numpy_iterator()):
                state, metrics = trainer.train_step(state, batch, trainer.teacher_variables)
                step += 1
                nonfinite.push(step, metrics)  # checks the previous step's: no stall per step
                window_images += config.batch_size
                if step % config.log_every_steps == 0 or step == total_steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - window_start
                    metrics["images_per_sec"] = window_images / max(elapsed, 1e-9)
                    metrics["lr"] = float(trainer.tx_schedule(step - 1))
                    window_start, window_images = time.perf_counter(), 0
                    last_train = metrics
                    tb.scalars(step, metrics, "train")
                    progress.update(0, loss=f"{metrics['loss']:.4f}", top1=f"{metrics['top1']:.3f}",
                                    img_s=f"{metrics['images_per_sec']:.0f}")
                    log.info("step %d/%d epoch %d: %s", step, total_steps, epoch, _fmt(metrics))
                progress.update(1)
                epoch_end = step % steps_per_epoch == 0 or step == total_steps
                eval_due = epoch_end and (step == total_steps or
                                          (step // steps_per_epoch) % config.eval_every_epochs == 0)
                if eval_due:
                    ev = evaluate(trainer, state, config)
                    tb.scalars(step, ev, "eval")
                    progress.write(f"eval after step {step} (epoch {epoch + 1}): {_fmt(ev)}")
                    meta = dict(meta, eval=ev)
                    if meta["best_top1"] is None or ev["top1"] > meta["best_top1"]:
                        meta["best_top1"] = ev["top1"]
                        save(best_manager, state, meta)
                if epoch_end or step % config.checkpoint_every_steps == 0:
                    nonfinite.flush()
                    save(manager, state, meta)
                if term.reached(step) and step < total_steps:  # a finished run just ends
                    nonfinite.flush()
                    save(manager, state, meta)
                    progress.write(f"SIGTERM at step {step}: checkpoint saved in "
                                   f"{workdir / 'checkpoints'}; run the same command to resume")
                    raise Preempted(f"preempted at step {step}; checkpoint saved")
                if step >= total_steps:
                    break
        nonfinite.flush()
    finally:
        term.restore()
        progress.close()
        tb.close()
        manager.wait_until_finished()
        best_manager.wait_until_finished()
    result = {"step": step, "train": last_train, "eval": meta.get("eval"),
              "best_top1": meta.get("best_top1"), "skipped_nonfinite_steps": nonfinite.skipped}
    if jax.process_index() == 0:
        (workdir / "final_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    trainer.final_state = state
    return result


def evaluate(trainer: training.Trainer, state, config) -> dict:
    per_process = config.eval_batch_size // jax.process_count()
    ds = data.make_dataset(config.dataset, config.eval_split, batch_size=per_process, train=False,
                           image_size=config.image_size, resize_size=config.resize_size,
                           data_dir=data_dir(config))
    return trainer.evaluate(trainer.variables(state), ds.as_numpy_iterator())


class _NonFiniteWatch:
    """Acts on a step's `finite` metric one step late, so checking never stalls the device.
    The step itself already kept the old state on a non-finite loss (see training.py)."""

    def __init__(self, config, workdir: Path):
        self.skip = bool(config.skip_nonfinite_steps)
        self.workdir = workdir
        self.pending = None
        self.skipped = 0

    def push(self, step: int, metrics) -> None:
        self.flush()
        self.pending = (step, metrics["finite"], metrics["loss"])

    def flush(self) -> None:
        if self.pending is None:
            return
        step, finite, loss = self.pending
        self.pending = None
        if float(jax.device_get(finite)):
            return
        loss = float(jax.device_get(loss))
        if self.skip:
            self.skipped += 1
            log.warning("loss is %s at step %d: step skipped (parameters unchanged; %d skipped so "
                        "far)", loss, step, self.skipped)
            return
        raise FloatingPointError(
            f"loss is {loss} at step {step}: the run diverged. Nothing of that step was kept and "
            f"the last good checkpoint in {self.workdir / 'checkpoints'} is intact; lower "
            "--config.learning_rate (or set --config.skip_nonfinite_steps=True to skip such "
            "steps) and run the same command again")


class _TermSignal:
    """SIGTERM, the usual preemption notice, as "save and stop after this step", at the same step
    on every process.

    One process: a Python handler notes the signal and the loop asks after each step. Several
    processes: the notice often reaches one host only, or the hosts at different steps, and a
    save is collective, so a process stopping on its own would hang the others. There JAX's
    preemption service (started by jax.distributed.initialize) takes SIGTERM on any host, tells
    the others, and `multihost_utils.reached_preemption_sync_point` turns True at one step on
    all of them."""

    def __init__(self):
        self.received = False
        self._old = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (asked after every step, on every process)."""
        if not self._multi:
            return self.received
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:  # the service is off (jax_enable_preemption_service=False)
            log.warning("no preemption handling across processes: %s", e)
            self._multi = False
            return False

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def _prefetch(trainer: training.Trainer, batches, depth: int = 2):
    """Puts the next `depth` batches on the devices while the current step runs."""
    queue = []
    for batch in batches:
        queue.append(trainer.shard_batch({k: batch[k] for k in ("image", "label")}))
        if len(queue) > depth:
            yield queue.pop(0)
    yield from queue


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
