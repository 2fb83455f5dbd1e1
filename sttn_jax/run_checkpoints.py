"""The checkpoints of a training run: Orbax managers (workdir/checkpoints keeps the last k,
workdir/best the best so far), each step saved atomically, and a resume that skips damaged steps.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sttn_jax import training
from sttn_jax.preflight import DISK_FULL, ConfigError

log = logging.getLogger("sttn_jax")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written during training (disk full, quota, read-only disk).
    Its own error so the command line reports it in one line instead of Orbax's or tensorstore's
    traceback: the checkpoints written before are intact, and the message names the workdir, the
    cause and the fix (free space, then the same command resumes)."""


def checkpoint_manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    """Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>`
    only when complete, so a run killed mid-save leaves no half-written `<step>` to load; the
    leftover temporary directory is deleted when the next run opens the manager."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, state, meta: dict) -> None:
    """Saves `state` and `meta` as the checkpoint of its step. A write that fails on the disk
    (full, over quota, read-only) raises CheckpointWriteError, one line naming the directory and
    the fix: the half-written step is never finalized, so the older checkpoints stay the newest
    and the same command resumes from them once there is space."""
    step = int(jax.device_get(state.step))
    if manager.latest_step() == step:
        return
    if jax.process_count() == 1:
        # One process holds every replica: its host copy is the same checkpoint (restored into
        # sharded arrays alike), written without Orbax picking one replica of each of ~500
        # replicated arrays: 0.85 s instead of 2.1 s on 8 CPU devices (smoke-size bwx2).
        state = jax.device_get(state)
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    except (OSError, ValueError) as e:
        code = _os_error_code(e)
        if code is None:
            raise
        directory = Path(manager.directory)
        fix = (f"free some space on the disk of {directory.parent}" if code in DISK_FULL
               else f"make {directory.parent} writable again")
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} in {directory} ({os.strerror(code)}); "
            f"the earlier checkpoints are intact: {fix}, then run the same command to resume"
        ) from e


def _os_error_code(e: Exception) -> int | None:
    """The errno of a failed write: an OSError's own, or the one tensorstore (under Orbax) puts
    in the text of the ValueError it raises, e.g. "... [os_error_code='28']". None: not a write
    failure of the disk."""
    if isinstance(e, OSError):
        return e.errno if e.errno is not None else errno.EIO
    match = re.search(r"os_error_code='?(\d+)", str(e))
    if match:
        return int(match.group(1))
    return errno.ENOSPC if "No space left on device" in str(e) else None


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
