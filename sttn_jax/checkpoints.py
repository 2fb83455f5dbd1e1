"""A training run's checkpoints: one Orbax `CheckpointManager` in `WORKDIR/checkpoints` keeps the
last k steps and the best top-1, each step with items "state" (the TrainState) and "meta" (JSON).
Orbax renames a step into place when complete, so a killed save leaves nothing half-written."""
import contextlib
import errno
import logging as std_logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from sttn_jax import processes
from sttn_jax.errors import CheckpointError, CheckpointWriteError, ConfigError

STATE, META = "state", "meta"
LATEST = "checkpoints"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NO_METRIC = float("-inf")


def _top1(metrics) -> float:
    return metrics.get("top1", NO_METRIC)


def manager(directory, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the newest `keep` steps and the best evaluated one; `read_only` writes nothing."""
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(n=keep), preservation_policy.BestN(get_metric_fn=_top1, n=1)])
    options = ocp.CheckpointManagerOptions(
        best_fn=_top1, best_mode="max", preservation_policy=policy, create=not read_only,
        enable_async_checkpointing=True, cleanup_tmp_directories=not read_only,
        save_root_metadata=not read_only)
    return _Manager(Path(directory).absolute(), options=options, item_names=(STATE, META))


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, but unparsable metrics count as none (Orbax reads all on creation and would
    raise before `restore_newest_good` could act). `saving_step`: the last save's, for failures."""

    saving_step: int | None = None

    def _get_metrics(self, step: int):
        try:
            return super()._get_metrics(step)
        except ValueError as e:  # json.JSONDecodeError
            logging.warning("the metrics of checkpoint step %d do not read back (%s)", step, e)
            return None


def best_step(mngr: ocp.CheckpointManager) -> int | None:
    """The kept step of the best top-1, or None when no kept step was evaluated."""
    step = mngr.best_step()
    return step if step is not None and _top1(mngr.metrics(step) or {}) > NO_METRIC else None


@contextlib.contextmanager
def _write_errors(directory: Path, step: int):
    """A write failing on the disk (full, over quota, read-only) as CheckpointWriteError."""
    try:
        yield
    except (OSError, ValueError) as e:
        code = _os_error_code(e)
        if code is None:
            raise
        fix = (f"free some space on the disk of {directory.parent}" if code in DISK_FULL
               else f"make {directory.parent} writable again")
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} in {directory} ({os.strerror(code)}); "
            f"the earlier checkpoints are intact: {fix}, then run the same command to resume"
        ) from e


def save(mngr: ocp.CheckpointManager, state, meta: dict, metrics: dict | None = None) -> None:
    """Starts saving the checkpoint of `state`'s step (`wait` ends it); raises earlier failures."""
    step = int(jax.device_get(state.step))
    if mngr.latest_step() == step:
        return
    # A host copy (the state is replicated), written once from process 0: from device arrays Orbax
    # would pick replicas and compile a slice program per array shape, which is much slower.
    state = jax.device_get(state)
    wait(mngr)  # Orbax's save waits for the previous one too, but would not say which failed
    with _write_errors(Path(mngr.directory), step):
        mngr.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                   META: ocp.args.JsonSave(meta)}),
                  metrics=metrics or {})
    mngr.saving_step = step


def wait(mngr: ocp.CheckpointManager) -> None:
    """Blocks until every started save is on disk; CheckpointWriteError names a failed step."""
    step = getattr(mngr, "saving_step", None)
    with _write_errors(Path(mngr.directory), mngr.latest_step() or 0 if step is None else step):
        mngr.wait_until_finished()


def quiet_orphaned_reads() -> None:
    """Called before a restore. When one fails, the reads Orbax still has in flight fail later, each
    printing a traceback long after (Orbax cannot wait for or cancel them); from the first call on,
    this process drops exactly those reports."""
    if not getattr(sys.unraisablehook, "drops_orbax_orphans", False):
        previous = sys.unraisablehook

        def hook(report):
            if not _orbax_orphan(report):
                previous(report)

        hook.drops_orbax_orphans = True
        sys.unraisablehook = hook
    asyncio_logger = std_logging.getLogger("asyncio")
    if _not_an_orbax_orphan not in asyncio_logger.filters:
        asyncio_logger.addFilter(_not_an_orbax_orphan)


def _a_failed_read(exc: BaseException | None) -> bool:
    """An error raised in Orbax's code, or TensorStore's own (its message starts with a status)."""
    return exc is not None and (re.match(r"[A-Z]+(_[A-Z]+)*: ", str(exc)) is not None or any(
        f"{os.sep}orbax{os.sep}" in frame.filename
        for frame in traceback.extract_tb(exc.__traceback__)))


def _orbax_orphan(report) -> bool:
    if report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed":
        frames = traceback.extract_tb(report.exc_traceback)
        return bool(frames) and frames[0].name == "call_soon_threadsafe"
    return hasattr(report.object, "cr_code") and _a_failed_read(report.exc_value)  # a coroutine


def _not_an_orbax_orphan(record: std_logging.LogRecord) -> bool:
    return not ("exception was never retrieved" in record.getMessage() and record.exc_info
                and _a_failed_read(record.exc_info[1]))


def _os_error_code(e: Exception) -> int | None:
    """The errno of a failed write (an OSError's, or in tensorstore's ValueError), else None."""
    if isinstance(e, OSError):
        return e.errno if e.errno is not None else errno.EIO
    if match := re.search(r"os_error_code='?(\d+)", str(e)):
        return int(match.group(1))
    return errno.ENOSPC if "No space left on device" in str(e) else None


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """(state, meta) of `step` (default: the newest), into the shardings of `abstract_state`."""
    quiet_orphaned_reads()
    step = mngr.latest_step() if step is None else step
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}))
    return restored[STATE], restored[META]


def restore_newest_good(mngr: ocp.CheckpointManager, abstract_state):
    """(state, meta) of the newest checkpoint that reads back (a damaged one is moved aside), or
    None; with several processes, process 0 finds the step (a failure on one would hang all)."""
    if jax.process_count() > 1:
        step = _newest_readable_step(mngr)
        mngr.reload()  # the steps process 0 moved aside are gone from every listing now
        return None if step is None else restore(mngr, abstract_state, step)
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore(mngr, abstract_state, step)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike
            _move_aside(mngr, step, e)
    if steps:
        raise _none_readable(mngr, steps)
    return None


def _newest_readable_step(mngr: ocp.CheckpointManager) -> int | None:
    """Process 0 finds the step (no barrier: the others wait in the broadcast); all get it."""
    no_checkpoint, none_readable = -1, -2
    steps = sorted(mngr.all_steps(), reverse=True) if jax.process_index() == 0 else []
    found = none_readable if steps else no_checkpoint
    for step in steps:
        try:  # every array and the meta (a Checkpointer would wait for the others)
            _host_tree(Path(mngr.directory) / str(step) / STATE)
            ocp.JsonCheckpointHandler().restore(Path(mngr.directory) / str(step) / META)
            found = step
            break
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike
            _move_aside(mngr, step, e)
    processes.wait_for_all("checkpoint found")  # reading them all may take process 0 a while
    found = int(multihost_utils.broadcast_one_to_all(np.int32(found)))
    if found == none_readable:
        raise _none_readable(mngr, steps if jax.process_index() == 0 else "see process 0")
    return None if found == no_checkpoint else found


def _host_tree(state_dir: Path, keys=None) -> dict:
    """A step's state item (or its top-level `keys`) as numpy arrays, read by this process alone."""
    quiet_orphaned_reads()
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = getattr(handler.metadata(state_dir), "tree", None)
        if not hasattr(tree, "keys") or (keys and "params" not in tree):
            raise CheckpointError(f"{state_dir}: holds no 'params'; not a train.py checkpoint")
        wanted = {k: tree[k] for k in keys or tree if k in tree}
        return handler.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=wanted, partial_restore=keys is not None, restore_args=jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)))
    finally:
        handler.close()


def _move_aside(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
    """Moves an unreadable step out of the manager's way (that step is written anew later)."""
    bad = Path(mngr.directory) / str(step)
    aside = bad.parent.parent / "unreadable_checkpoints" / f"{step}-{int(time.time())}"
    logging.warning("checkpoint %s is unreadable (%s: %s); moving it to %s and trying an older "
                    "one", bad, type(error).__name__, (str(error).splitlines() or [""])[0][:200],
                    aside)
    aside.parent.mkdir(parents=True, exist_ok=True)
    bad.rename(aside)
    mngr.reload()


def _none_readable(mngr: ocp.CheckpointManager, steps) -> ConfigError:
    return ConfigError(f"no checkpoint in {mngr.directory} reads back (steps {steps}); move "
                       "that directory away to start over, or restore it from a backup")


def steps(directory) -> list[int]:
    """The finalized steps in a checkpoint directory, ascending ([] if none)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return []
    return sorted(int(s) for s in ocp.path.step.checkpoint_steps(directory))


def read_variables(directory, step: int):
    """(variables, meta) of `step`: {"params", "batch_stats"} as numpy arrays exactly as saved."""
    directory = Path(directory).absolute()
    if step not in steps(directory):
        raise CheckpointError(f"{directory}: no checkpoint of step {step}; steps there: "
                              f"{steps(directory) or 'none'}")
    state_dir = directory / str(step) / STATE
    if not state_dir.is_dir():
        raise CheckpointError(f"{directory / str(step)}: no '{STATE}' item; not a checkpoint "
                              "written by train.py")
    try:
        restored = _host_tree(state_dir, ("params", "batch_stats"))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint becomes one message
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{state_dir}: cannot be restored ({type(e).__name__}: "
                              f"{last})") from None
    plain = lambda t: traverse_util.unflatten_dict(  # noqa: E731 - Orbax may return other mappings
        {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(t)).items()})
    variables = {"params": plain(restored["params"]),
                 "batch_stats": plain(restored.get("batch_stats", {}))}
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as json_ckptr:
        try:
            meta = json_ckptr.restore(directory / str(step) / META)
        except Exception:  # noqa: BLE001 - the meta item is informative only
            meta = {}
    return variables, meta
