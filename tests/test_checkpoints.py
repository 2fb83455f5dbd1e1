"""The run's checkpoints: a disk that fills up during training stops the run in one line naming
the workdir and the fix, and the earlier checkpoints stay usable."""
import errno
import os
import threading
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sttn_jax import checkpoints, train_loop, training
from sttn_jax.errors import CheckpointWriteError
from tests.conftest import one_line, smoke_config


def test_disk_full_at_a_checkpoint_stops_in_one_line_and_keeps_the_last_checkpoint(
        smoke_data_dir, tmp_path, monkeypatch, capsys):
    """The second checkpoint save fails with ENOSPC: the run stops naming the workdir and the
    fix, and step 1's checkpoint stays the newest and restores as the same command would
    (restore_newest_good). Resuming itself is test_reliability's; not rerun here, to save the
    compile of the eval step."""
    workdir = tmp_path / "w"
    real_save = ocp.CheckpointManager.save
    calls = []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    config = smoke_config(smoke_data_dir, num_train_steps=3, checkpoint_every_steps=1)
    with pytest.raises(CheckpointWriteError) as info:
        train_loop.train_and_evaluate(config, workdir)
    assert calls == [1, 2]
    line = one_line(info.value, capsys)
    assert f"checkpoint of step 2 in {workdir / 'checkpoints'} (No space left on device)" in line
    assert f"free some space on the disk of {workdir}" in line
    assert "run the same command to resume" in line
    manager = checkpoints.manager(workdir / checkpoints.LATEST, config.keep_checkpoints)
    assert manager.latest_step() == 1 and manager.all_steps() == [1]
    mesh = training.make_mesh()
    tx = training.create_optimizer(config, training.learning_rate_fn(config, 3))
    state, meta = checkpoints.restore_newest_good(manager, training.abstract_train_state(config, mesh, tx))
    assert int(state.step) == 1 and meta["arch"] == "resnet18_bwx2"
    params = jax.device_get(state.params)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_save_recognises_the_write_errors_orbax_raises(tmp_path):
    """Orbax writes through tensorstore, which reports a failed write as a ValueError whose text
    carries the errno (seen with a file size limit: "... File too large [os_error_code='27']").
    That becomes CheckpointWriteError too; any other ValueError passes through unchanged."""

    class Manager:
        directory = tmp_path / "checkpoints"

        def __init__(self, error):
            self.error = error

        def latest_step(self):
            return 4

        def save(self, step, args, metrics=None):
            raise self.error

        def wait_until_finished(self):
            pass

    state = SimpleNamespace(step=np.int32(5))
    tensorstore = ValueError('OUT_OF_RANGE: Error writing "step" in OCDBT database: Failed to '
                             "write 3597028 bytes to file 11: No space left on device "
                             "[os_error_code='28']")
    with pytest.raises(CheckpointWriteError,
                       match=r"step 5 in .*checkpoints \(No space left on device\).*free some "
                             r"space on the disk of"):
        checkpoints.save(Manager(tensorstore), state, {})
    with pytest.raises(CheckpointWriteError, match=r"\(Read-only file system\).*make "
                                                              r".* writable again"):
        checkpoints.save(Manager(OSError(errno.EROFS, "Read-only file system")), state, {})
    other = ValueError("a bug, not the disk")
    with pytest.raises(ValueError) as info:
        checkpoints.save(Manager(other), state, {})
    assert info.value is other


def test_a_step_with_damaged_metrics_counts_as_one_without_metrics(tmp_path):
    """checkpoints._Manager's reason to be: Orbax's own manager refuses to open a directory in
    which one step's metrics do not parse. If this test fails at the first `raises`, Orbax no
    longer does: drop _Manager. If it fails after, the override is no longer called."""
    mngr = checkpoints.manager(tmp_path, keep=2)
    for step, top1 in ((1, 0.5), (2, 0.25)):
        mngr.save(step, args=ocp.args.Composite(**{
            checkpoints.STATE: ocp.args.StandardSave({"w": np.full(3, step, np.float32)}),
            checkpoints.META: ocp.args.JsonSave({})}), metrics={"top1": top1})
    mngr.wait_until_finished()
    mngr.close()
    assert checkpoints.best_step(checkpoints.manager(tmp_path, 2, read_only=True)) == 1
    metrics = tmp_path / "1" / "metrics" / "metrics"
    assert metrics.is_file()
    metrics.write_bytes(b"\0garbage")
    with pytest.raises(ValueError):
        ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(read_only=True),
                              item_names=(checkpoints.STATE, checkpoints.META))
    mngr = checkpoints.manager(tmp_path, 2, read_only=True)
    assert mngr.all_steps() == [1, 2] and mngr.metrics(1) is None
    assert checkpoints.best_step(mngr) == 2


@pytest.mark.parametrize("failing,surfaces_at", [(2, "the save of step 3"), (3, "the last wait")])
def test_a_save_failing_in_the_background_stops_naming_its_step(
        smoke_data_dir, tmp_path, monkeypatch, capsys, failing, surfaces_at):
    """Orbax saves asynchronously: the write of step `failing` fails with ENOSPC in its background
    thread, after `save` returned, and surfaces at the next save or at the final wait. The run
    stops in one line naming that step (not the one being saved when it surfaced), and the
    earlier checkpoints load."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    handler = json_checkpoint_handler.JsonCheckpointHandler
    real_write, threads = handler._save_fn, []

    async def write(self, x, directory):
        if directory.parent.name.split(".")[0] == str(failing):
            threads.append(threading.current_thread())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await real_write(self, x, directory)

    monkeypatch.setattr(handler, "_save_fn", write)
    workdir = tmp_path / "w"
    config = smoke_config(smoke_data_dir, num_train_steps=3, checkpoint_every_steps=1,
                          keep_checkpoints=3)
    with pytest.raises(CheckpointWriteError) as info:
        train_loop.train_and_evaluate(config, workdir)
    assert threads and threading.main_thread() not in threads  # it failed in the background
    line = one_line(info.value, capsys)
    assert f"checkpoint of step {failing} in {workdir / 'checkpoints'} (No space left on device)" \
        in line, (surfaces_at, line)
    assert f"free some space on the disk of {workdir}" in line
    manager = checkpoints.manager(workdir / checkpoints.LATEST, config.keep_checkpoints)
    assert manager.all_steps() == list(range(1, failing))
    mesh = training.make_mesh()
    tx = training.create_optimizer(config, training.learning_rate_fn(config, 3))
    state, meta = checkpoints.restore_newest_good(manager, training.abstract_train_state(config, mesh, tx))
    assert int(state.step) == failing - 1 and meta["arch"] == "resnet18_bwx2"
