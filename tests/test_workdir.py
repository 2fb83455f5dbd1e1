"""The workdir: one run at a time (a lock naming its holder), writable, with room for a
checkpoint; each refused before anything is written, in one line naming the fix."""
import errno
import os
from pathlib import Path

import pytest

from sttn_jax import training, workdir as workdir_lib
from sttn_jax.errors import ConfigError, WorkdirLockedError
from tests.conftest import refused, smoke_config, trap


def test_workdir_that_cannot_be_created_is_refused(smoke_data_dir, tmp_path, no_training, capsys):
    """A workdir below a regular file: mkdir fails whoever runs the test (root included)."""
    (tmp_path / "a_file").write_text("x")
    workdir = tmp_path / "a_file" / "run"
    line = refused(smoke_config(smoke_data_dir), workdir, ConfigError,
                   "is not writable", capsys)
    assert str(workdir) in line and "pick another --workdir" in line


def test_read_only_workdir_is_refused(smoke_data_dir, tmp_path, no_training, monkeypatch, capsys):
    """A directory the run may not write to. File modes cannot make one for root (CI runs as
    root), so the write into it fails as the kernel fails it for anyone else: EACCES."""
    workdir = tmp_path / "ro"
    workdir.mkdir()
    write_bytes = Path.write_bytes

    def denied(self, data):
        if self.parent == workdir:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", denied)
    line = refused(smoke_config(smoke_data_dir), workdir, ConfigError,
                   r"is not writable \(Permission denied\)", capsys)
    assert str(workdir) in line and "pick another --workdir" in line
    assert list(workdir.iterdir()) == []


def test_full_workdir_is_refused_at_start_up(smoke_data_dir, tmp_path, monkeypatch, capsys):
    """Both ways a disk shows it is full before training: too little room for one checkpoint of
    this run (bwx2: 22.5 M float32 parameters plus two Adam moments, about 258 MiB), refused
    once the state's size is known but before any state is built or step taken; and the probe
    write itself failing with ENOSPC, before anything at all."""
    monkeypatch.setattr(training, "create_train_state", trap)
    for free_mib in (1, 100):
        monkeypatch.setattr(workdir_lib, "free_bytes", lambda path, n=free_mib: n << 20)
        line = refused(smoke_config(smoke_data_dir), tmp_path / f"w{free_mib}",
                       ConfigError,
                       rf"has {free_mib} MiB free but one checkpoint of this run takes 25\d MiB",
                       capsys)
        assert "free some space or pick another --workdir" in line
    monkeypatch.setattr(training, "make_train_step", trap)
    write_bytes = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".write_probe"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    line = refused(smoke_config(smoke_data_dir), tmp_path / "w2", ConfigError,
                   r"is on a full disk \(No space left on device\)", capsys)
    assert "free some space there or pick another --workdir" in line


def test_a_live_holder_refuses_a_second_run_naming_its_host_and_pid(tmp_path):
    with workdir_lib.lock(tmp_path):
        held = (tmp_path / workdir_lib.LOCK_FILE).read_text()
        assert f'"pid": {os.getpid()}' in held
        with pytest.raises(WorkdirLockedError, match=rf"is in use by the run of pid {os.getpid()} "
                                                     rf"on host {os.uname().nodename}"):
            with workdir_lib.lock(tmp_path):
                pass
    assert not (tmp_path / workdir_lib.LOCK_FILE).exists()  # released and removed at the end
    with workdir_lib.lock(tmp_path):  # free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / workdir_lib.LOCK_FILE).write_text(
        f'{{"host": "{os.uname().nodename}", "pid": 999999999, "since": 0}}')
    with caplog.at_level("WARNING", logger="absl"):
        with workdir_lib.lock(tmp_path):
            pass
    assert any("taking over the lock" in r.getMessage() and "999999999" in r.getMessage()
               for r in caplog.records)


def test_a_lock_from_another_host_needs_the_takeover_flag(tmp_path):
    (tmp_path / workdir_lib.LOCK_FILE).write_text('{"host": "node-17", "pid": 4242, "since": 0}')
    with pytest.raises(WorkdirLockedError, match=r"locked by pid 4242 on host node-17, which cannot "
                                                 r"be checked from .*--take_over_lock"):
        with workdir_lib.lock(tmp_path):
            pass
    with workdir_lib.lock(tmp_path, take_over=True):
        assert f'"pid": {os.getpid()}' in (tmp_path / workdir_lib.LOCK_FILE).read_text()
