"""What a run shows while it goes (process 0): TensorBoard events in `WORKDIR/tensorboard` (clu),
a tqdm progress bar below the log lines, and every log line also in `WORKDIR/train.log`."""
import contextlib
import logging as std_logging
import sys
from pathlib import Path

import jax
import numpy as np
from absl import logging

from sttn_jax import training
from sttn_jax.data import tf_import

tf_import.tf()  # before clu imports TensorFlow: TensorFlow must never see (and take) a GPU
from clu import metric_writers, periodic_actions  # noqa: E402

HPARAMS = ("arch", "dataset", "dtype", "batch_size", "learning_rate", "num_epochs", "image_size",
           "teacher_arch", "teacher_checkpoint", "sync_batch_stats", "seed", "data_shards")


class MetricWriter:
    """TensorBoard scalars, sparsity and hyperparameters, and the hooks that report through it."""

    def __init__(self, workdir: Path, config, total_steps: int):
        logdir = str(Path(workdir) / "tensorboard")
        self.writer = (metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))
                       if jax.process_index() == 0 else metric_writers.MultiWriter([]))
        self.writer.write_hparams({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                   for k, v in config.items() if k in HPARAMS})
        self.hooks = [periodic_actions.ReportProgress(
            num_train_steps=total_steps, writer=self.writer, every_steps=config.log_every_steps)]
        if config.profile_steps and jax.process_index() == 0:
            self.hooks.append(periodic_actions.Profile(
                logdir=logdir, num_profile_steps=config.profile_steps, profile_duration_ms=None))

    def step(self, step: int) -> None:
        """Called after every training step (timing, progress, profiling)."""
        for hook in self.hooks:
            hook(step)

    def write_scalars(self, step: int, prefix: str, values: dict) -> None:
        self.writer.write_scalars(step, {f"{prefix}/{k}": float(v) for k, v in values.items()
                                         if isinstance(v, (int, float, np.number))
                                         and not isinstance(v, bool)})

    def write_sparsity(self, step: int, params) -> None:
        """The fraction of zeros of every folded ternary kernel (counted on the devices)."""
        fractions = jax.device_get(training.ternary_zero_fraction(params, per_kernel=True))
        self.writer.write_scalars(step, {f"sparsity/{k}": float(v) for k, v in fractions.items()})

    def close(self) -> None:
        self.writer.close()


class Progress:
    """A tqdm bar with ETA and the latest metrics, on process 0 when `enabled`."""

    def __init__(self, enabled: bool, total: int, initial: int = 0, unit: str = "step",
                 desc: str = "train"):
        from tqdm.auto import tqdm
        from tqdm.contrib import DummyTqdmFile

        self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr,
                        dynamic_ncols=True, disable=not (enabled and jax.process_index() == 0))
        handler = logging.get_absl_handler().python_handler
        self._stream = handler.stream
        if not self.bar.disable:
            handler.stream = DummyTqdmFile(sys.stderr)

    def update(self, position: int) -> None:
        self.bar.update(position - self.bar.n)

    def advance(self) -> None:
        self.bar.update(1)

    def show(self, metrics: dict) -> None:
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "top1", "images_per_sec")
                              if k in metrics}, refresh=False)

    def close(self) -> None:
        if not self.bar.disable:  # a closed bar is disabled too
            self.bar.close()
            logging.get_absl_handler().python_handler.stream = self._stream


@contextlib.contextmanager
def log_file(path: Path):
    """Also writes the run's log lines into `path` (process 0) for the `with` block."""
    handler, absl_logger = None, logging.get_absl_logger()
    level = absl_logger.level
    if jax.process_index() == 0:
        handler = std_logging.FileHandler(path)
        handler.setFormatter(logging.PythonFormatter())
        for log_filter in logging.get_absl_handler().filters:
            handler.addFilter(log_filter)
        std_logging.getLogger().addHandler(handler)
        if absl_logger.getEffectiveLevel() > std_logging.INFO:  # called as a library
            absl_logger.setLevel(std_logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            absl_logger.setLevel(level)
            std_logging.getLogger().removeHandler(handler)
            handler.close()
