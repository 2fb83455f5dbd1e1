"""`train_and_evaluate(config, workdir)`: the whole training run, what train.py calls. The workdir
holds `checkpoints/`, `tensorboard/`, `config.json`, `train.log` and `final_metrics.json`; an
interrupted run resumes exactly (the data stream is a function of (seed, epoch, data_shards))."""
import json
import signal
import threading
import time
from pathlib import Path

import jax
from absl import logging
from jax.experimental import multihost_utils

from sttn_jax import archs, checkpoints, json_io, model_io, training, workdir as workdir_lib
from sttn_jax.data import pipeline, sources
from sttn_jax.errors import ArchMismatchError, CheckpointError, ConfigError
from sttn_jax.metric_writers import MetricWriter, Progress, log_file


FINAL_METRICS = "final_metrics.json"


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the current step was saved before stopping."""


def load_teacher(config):
    """The teacher's variables, refused before training: another arch or classes, or damaged."""
    path, want = config.teacher_checkpoint, config.teacher_arch
    if want not in archs.ARCHS:
        raise ConfigError(f"config.teacher_arch={want!r}: choose one of {list(archs.ARCHS)} "
                          "(the usual teacher is --config.teacher_arch=resnet50)")
    if not Path(path).exists():
        raise ConfigError(f"config.teacher_checkpoint={path!r} does not exist")
    try:
        loaded = model_io.load(path, arch=want)
    except ArchMismatchError as e:
        fix = f"set --config.teacher_checkpoint to a {want} checkpoint"
        fix += " (e.g. torchvision's resnet50-0676ba61.pth)" if want == "resnet50" else ""
        if e.found in archs.ARCHS:
            fix += f", or --config.teacher_arch={e.found} if this model is the teacher you mean"
        raise CheckpointError(f"teacher checkpoint {path} holds a {e.found} model but "
                              f"config.teacher_arch={want!r}; {fix}") from None
    except CheckpointError as e:  # a damaged file: say which flag gave it
        raise CheckpointError(f"config.teacher_checkpoint: {e}") from None
    if loaded.num_classes != config.num_classes:
        raise CheckpointError(
            f"teacher {path} has {loaded.num_classes} classes but config.num_classes="
            f"{config.num_classes}; give a teacher trained on the same {config.num_classes} "
            f"classes (--config.teacher_checkpoint=...) or set "
            f"--config.num_classes={loaded.num_classes}")
    return loaded.variables


def train_and_evaluate(config, workdir, take_over_lock: bool = False) -> dict:
    """Trains (or resumes) in `workdir`; returns the final metrics (as in final_metrics.json)."""
    workdir = Path(workdir)
    mesh = training.make_mesh()
    training.check_config(config, mesh.devices.size)
    teacher = load_teacher(config) if config.teacher_checkpoint else None
    workdir_lib.check_writable(workdir)
    with workdir_lib.lock(workdir, take_over_lock), log_file(workdir / "train.log"):
        return _train(config, workdir, mesh, teacher)


def _train(config, workdir: Path, mesh, teacher) -> dict:
    sources.prepare(config)
    sources.check(config)
    steps_per_epoch = sources.train_layout(config).steps_per_epoch
    total_steps = training.total_steps(config, steps_per_epoch)
    finished = _finished_run(workdir, total_steps)
    if finished is not None:  # nothing is written: its final metrics and events stay as they are
        logging.info("%s: this run is finished (step %d of %d, final metrics in %s); nothing to "
                     "do (to train longer, raise config.num_epochs or config.num_train_steps)",
                     workdir, finished["step"], total_steps, workdir / FINAL_METRICS)
        return finished
    learning_rate = training.learning_rate_fn(config, steps_per_epoch)
    tx = training.create_optimizer(config, learning_rate)
    abstract_state = training.abstract_train_state(config, mesh, tx)
    workdir_lib.check_space(workdir, sum(x.size * x.dtype.itemsize
                                         for x in jax.tree_util.tree_leaves(abstract_state)))
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    latest = checkpoints.manager(workdir / checkpoints.LATEST, config.keep_checkpoints)
    restored = checkpoints.restore_newest_good(latest, abstract_state)
    if restored is not None:
        state, meta = restored
        logging.info("resumed from %s at step %d", latest.directory, int(state.step))
    else:
        state = training.create_train_state(config, mesh, tx, rng=jax.random.PRNGKey(config.seed))
        meta = {"arch": config.arch, "best_top1": None, "eval": None}
    train_step = training.make_train_step(config, mesh, tx, teacher)
    eval_step = training.make_eval_step(config, mesh)
    step = int(jax.device_get(state.step))
    _log_plan(config, workdir, mesh, total_steps, steps_per_epoch, step)
    writer = MetricWriter(workdir, config, total_steps)
    progress = Progress(config.progress_bar, total_steps, step)
    nonfinite = _NonFiniteWatch(config, workdir)
    term = _TermSignal()
    last_train, timer = {}, (time.perf_counter(), 0)
    try:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            batches = pipeline.make_train_dataset(config, epoch=epoch, skip_batches=skip)
            for batch in _on_devices(mesh, pipeline.numpy_batches(batches)):
                state, metrics = train_step(state, batch)
                step += 1
                nonfinite.push(step, metrics)  # checks the previous step's: no stall per step
                progress.update(step)
                writer.step(step)
                if step % config.log_every_steps == 0 or step == total_steps:
                    # timed once this step's metrics are back: the steps have run, not just queued
                    metrics = dict(metrics, ternary_zero_fraction=training.ternary_zero_fraction(
                        state.params))
                    last_train = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    last_train.update(learning_rate=float(learning_rate(step - 1)),
                                      images_per_sec=(step - timer[1]) * config.batch_size
                                      / (now - timer[0]))
                    timer = (now, step)
                    writer.write_scalars(step, "train", last_train)
                    progress.show(last_train)
                    logging.info("step %d/%d epoch %d: %s", step, total_steps, epoch,
                                 _fmt(last_train))
                epoch_end = step % steps_per_epoch == 0 or step == total_steps
                evaluated = None
                if epoch_end and (step == total_steps or
                                  (step // steps_per_epoch) % config.eval_every_epochs == 0):
                    evaluated = training.evaluate(
                        eval_step, mesh, training.eval_variables(state),
                        pipeline.numpy_batches(pipeline.make_eval_dataset(config)))
                    writer.write_scalars(step, "eval", evaluated)
                    writer.write_sparsity(step, state.params)
                    logging.info("eval after step %d (epoch %d): %s", step, epoch + 1,
                                 _fmt(evaluated))
                    best = max(evaluated["top1"], meta["best_top1"] or -1.0)
                    meta = dict(meta, eval=evaluated, best_top1=best)
                if evaluated or epoch_end or step % config.checkpoint_every_steps == 0:
                    nonfinite.flush()
                    checkpoints.save(latest, state, meta, evaluated)
                if term.reached(step) and step < total_steps:  # a finished run just ends
                    nonfinite.flush()
                    checkpoints.save(latest, state, meta)
                    checkpoints.wait(latest)
                    logging.warning("SIGTERM at step %d: checkpoint saved in %s; run the same "
                                    "command to resume", step, latest.directory)
                    raise Preempted(f"preempted at step {step}; checkpoint saved")
                if step >= total_steps:
                    break
    finally:
        term.restore()
        progress.close()
        writer.close()
        checkpoints.wait(latest)
    result = {"step": step, "train": last_train, "eval": meta.get("eval"),
              "best_top1": meta.get("best_top1"), "skipped_nonfinite_steps": nonfinite.skipped}
    if jax.process_index() == 0:
        json_io.write_json(result, workdir / FINAL_METRICS)
    return result


def _finished_run(workdir: Path, total_steps: int) -> dict | None:
    """The final metrics of a run in `workdir` that reached `total_steps`, else None."""
    try:
        final = json.loads((workdir / FINAL_METRICS).read_text())
        return final if int(final["step"]) >= total_steps else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _log_plan(config, workdir: Path, mesh, total_steps: int, steps_per_epoch: int, step: int):
    """What the run is about to do, in a few lines."""
    devices, hosts = mesh.devices.size, jax.process_count()
    examples = sources.split_examples(sources.config_builder(config), config.train_split)
    teacher = (f"{config.teacher_checkpoint} ({config.teacher_arch}, distillation)"
               if config.teacher_checkpoint else "none (cross-entropy on labels)")
    logging.info("training %s on %s/%s: %d examples, %d steps (%d per epoch)", config.arch,
                 config.dataset, config.train_split, examples, total_steps, steps_per_epoch)
    logging.info("global batch %d over %d devices (%s, %d host%s): %d per device; dtype %s",
                 config.batch_size, devices, mesh.devices.flat[0].platform, hosts,
                 "" if hosts == 1 else "s", config.batch_size // devices, config.dtype)
    logging.info("teacher: %s", teacher)
    logging.info("workdir %s: %s", workdir,
                 f"resumes from step {step}" if step else "a new run from step 0")


def _on_devices(mesh, batches, depth: int = 2):
    """Puts the next `depth` batches on the devices while the current step runs."""
    queue = []
    for batch in batches:
        queue.append(training.shard_batch(mesh, {k: batch[k] for k in ("image", "label")}))
        if len(queue) > depth:
            yield queue.pop(0)
    yield from queue


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())


class _NonFiniteWatch:
    """Reads a step's `finite` metric one step late, so checking never stalls the device."""

    def __init__(self, config, workdir: Path):
        self.skip, self.workdir = bool(config.skip_nonfinite_steps), workdir
        self.pending, self.skipped = None, 0

    def push(self, step: int, metrics) -> None:
        self.flush()
        self.pending = (step, metrics["finite"], metrics["loss"])

    def flush(self) -> None:
        pending, self.pending = self.pending, None
        if pending is None or float(jax.device_get(pending[1])):
            return
        step, loss = pending[0], float(jax.device_get(pending[2]))
        if self.skip:
            self.skipped += 1
            logging.warning("loss is %s at step %d: step skipped (parameters unchanged; %d skipped "
                            "so far)", loss, step, self.skipped)
            return
        raise FloatingPointError(
            f"loss is {loss} at step {step}: the run diverged. Nothing of that step was kept and "
            f"the last good checkpoint in {self.workdir / checkpoints.LATEST} is intact; lower "
            "--config.learning_rate (or set --config.skip_nonfinite_steps=True to skip such "
            "steps) and run the same command again")


class _TermSignal:
    """SIGTERM (preemption) as "save and stop after this step", at the same step on every process
    (there through JAX's preemption service: the notice may reach one host only)."""

    def __init__(self):
        self.received, self._old = False, None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "received", True))

    def reached(self, step: int) -> bool:
        if not self._multi:
            return self.received
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:  # the service is off (jax_enable_preemption_service=False)
            logging.warning("no preemption handling across processes: %s", e)
            self._multi = False
            return False

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
