"""`train_and_evaluate(config, workdir)`: the whole training run, resumable.

The workdir holds `checkpoints/` (an Orbax CheckpointManager keeping the last k), `best/` (the
checkpoint with the best top-1 so far), `tensorboard/` event files, and `config.json`. Running the
same command on the workdir of an interrupted run resumes exactly: the state (step, parameters,
Adam moments, BatchNorm statistics) comes from the newest checkpoint, and the data stream is a pure
function of (seed, epoch) from which the batches already seen in the epoch are skipped.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sttn_jax import checkpoints, data, models, training

log = logging.getLogger("sttn_jax")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the current step was saved before stopping."""


def validate_model_config(config) -> None:
    """The checks training and evaluation share: dtype, image and resize sizes."""
    if config.dtype not in training.DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}: choose one of {sorted(training.DTYPES)}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("config.dtype='float64' needs JAX_ENABLE_X64=1 in the environment")
    if config.image_size < models.MIN_IMAGE_SIZE:
        raise ConfigError(f"config.image_size={config.image_size}: images must be at least "
                          f"{models.MIN_IMAGE_SIZE} (the network downsamples 32x); use "
                          f"--config.image_size={models.MIN_IMAGE_SIZE} or more")
    if config.resize_size < config.image_size:
        raise ConfigError(f"config.resize_size={config.resize_size} is below image_size="
                          f"{config.image_size}; the crop must fit: use resize_size >= image_size")


def validate_config(config, num_devices: int) -> None:
    """Refuses bad values up front, each with a one-line message that names the fix."""
    if config.arch not in ("resnet18_bwx2", "resnet18_ter"):
        raise ConfigError(f"config.arch={config.arch!r}: train.py trains 'resnet18_bwx2' (or "
                          "'resnet18_ter' as a plain network); set --config.arch=resnet18_bwx2")
    validate_model_config(config)
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value <= 0:
            raise ConfigError(f"config.{key}={value} must be positive")
        try:
            training.check_batch_divisible(value, num_devices, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if config.num_epochs <= 0 and config.num_train_steps <= 0:
        raise ConfigError("set config.num_epochs or config.num_train_steps to a positive number")
    if config.checkpoint_every_steps <= 0:
        raise ConfigError("config.checkpoint_every_steps must be positive")
    if config.teacher_checkpoint and not os.path.exists(config.teacher_checkpoint):
        raise ConfigError(f"config.teacher_checkpoint={config.teacher_checkpoint!r} does not exist")


def check_workdir_writable(workdir: Path, min_free_bytes: int = 64 << 20) -> None:
    """Fails at start-up, not at the first save, when the workdir cannot take checkpoints."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_probe"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable ({e.strerror}); pick another "
                          "--workdir or fix its permissions") from None
    free = _free_bytes(workdir)
    if free < min_free_bytes:
        raise ConfigError(f"workdir {workdir} has only {free >> 20} MiB free; a checkpoint needs "
                          f"more: free some space or pick another --workdir")


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def load_teacher(config):
    """Teacher variables from a torchvision .pth (via interop) or a converted model checkpoint."""
    path = config.teacher_checkpoint
    if checkpoints.is_model_checkpoint(path):
        variables, _ = checkpoints.load_model_checkpoint(path, arch=config.teacher_arch)
    else:
        from sttn_jax import interop

        variables = interop.load_torch_checkpoint(path, arch=config.teacher_arch)
    return variables


def checkpoint_manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, state, meta: dict) -> None:
    step = int(jax.device_get(state.step))
    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, trainer: training.Trainer, step: int | None = None):
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state()), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def restore_newest_good(manager: ocp.CheckpointManager, trainer: training.Trainer):
    """(state, meta) from the newest checkpoint that reads back; a damaged one (half-written,
    truncated, corrupted) is skipped with a warning naming it. None when there is none at all."""
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore(manager, trainer, step)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike
            bad = Path(manager.directory) / str(step)
            aside = Path(manager.directory).parent / "unreadable_checkpoints" / f"{step}-{int(time.time())}"
            log.warning("checkpoint %s is unreadable (%s: %s); moving it to %s and trying an older "
                        "one", bad, type(e).__name__, (str(e).splitlines() or [""])[0][:200], aside)
            if jax.process_index() == 0:
                aside.parent.mkdir(parents=True, exist_ok=True)
                bad.rename(aside)  # out of the manager's way: that step is written anew later
            manager.reload()
    if steps:
        raise ConfigError(f"no checkpoint in {manager.directory} reads back (steps {steps}); move "
                          "that directory away to start over, or restore it from a backup")
    return None


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


def _data_dir(config):
    return config.data_dir or None


def prepare_data(config) -> None:
    if config.fabricate_data:
        if config.dataset != "imagenet2012":
            raise ConfigError("config.fabricate_data fabricates an imagenet2012; set "
                              "--config.dataset=imagenet2012 or --config.fabricate_data=False")
        if jax.process_index() == 0:
            data.ensure_fake_imagenet(config.data_dir)
    elif config.dataset == "sttn_digits":
        if jax.process_index() == 0:
            data.ensure_digits(config.data_dir)


def train_and_evaluate(config, workdir) -> dict:
    """Trains (or resumes) in `workdir`; returns the final metrics
    {"step", "train": {...}, "eval": {...} or None, "best_top1"}."""
    workdir = Path(workdir)
    mesh = training.make_mesh()
    validate_config(config, mesh.devices.size)
    check_workdir_writable(workdir)
    prepare_data(config)
    process_count = jax.process_count()
    per_process_batch = config.batch_size // process_count
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.train_split, config.batch_size,
                                           _data_dir(config))
    if steps_per_epoch == 0:
        n = data.num_examples(config.dataset, config.train_split, _data_dir(config))
        raise ConfigError(f"the {config.train_split} split has {n} examples, fewer than one batch "
                          f"of {config.batch_size}; lower --config.batch_size")
    total_steps = training.steps_from_epochs(config, steps_per_epoch)
    teacher = load_teacher(config) if config.teacher_checkpoint else None
    trainer = training.Trainer(config, steps_per_epoch, mesh, teacher_variables=teacher)

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
                epoch=epoch, data_dir=_data_dir(config), skip_batches=skip,
                shuffle_buffer=config.shuffle_buffer, random_flip=config.random_flip)
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
                if term.received:
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
                           data_dir=_data_dir(config))
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
    """Notes SIGTERM (the usual preemption notice) so the loop can save and stop cleanly."""

    def __init__(self):
        self.received = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

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
