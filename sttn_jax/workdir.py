"""The workdir of a training run: one run at a time, writable, with room for its checkpoints. The
lock, `WORKDIR/.lock`, is flock'ed for the run (the kernel drops it when the process dies) and
names its host and pid; one written on another host is refused unless --take_over_lock. Process 0
takes it and every process reads it back: a workdir not shared by all is refused at the start."""
import contextlib
import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sttn_jax.checkpoints import DISK_FULL
from sttn_jax.errors import ConfigError, WorkdirLockedError

LOCK_FILE = ".lock"
SHARED_CHECK_ROUNDS = 10  # one a second: a network filesystem may show a new file a little late


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _acquire(path: Path, take_over: bool) -> tuple[int, int]:
    """(the locked file descriptor of `path`, the run's id), or WorkdirLockedError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        held = _holder(path)
        raise WorkdirLockedError(
            f"workdir {path.parent} is in use by the run of pid {held.get('pid', '?')} on host "
            f"{held.get('host', socket.gethostname())}; wait for it to end or stop it, or give "
            "this run another --workdir") from None
    held, me = _holder(path), socket.gethostname()
    if held.get("pid") and held.get("host") != me and not take_over:
        os.close(fd)
        raise WorkdirLockedError(
            f"workdir {path.parent} is locked by pid {held['pid']} on host {held['host']}, which "
            f"cannot be checked from {me}; if that run has ended, start this one with "
            "--take_over_lock")
    if held.get("pid"):
        logging.warning("taking over the lock of workdir %s from pid %s on host %s (no longer "
                        "running)", path.parent, held["pid"], held.get("host"))
    run = secrets.randbelow(2**31 - 1) + 1
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": me, "pid": os.getpid(), "since": time.time(),
                              "run": run}).encode(), 0)
    os.fsync(fd)  # the other processes read it next, perhaps from other hosts
    return fd, run


@contextlib.contextmanager
def lock(workdir: Path, take_over: bool = False):
    """Holds the workdir's lock for the `with` block (process 0 for all; all stop if it cannot)."""
    path, fd, run, error = Path(workdir) / LOCK_FILE, None, 0, None
    if jax.process_index() == 0:
        try:
            fd, run = _acquire(path, take_over)
        except WorkdirLockedError as e:
            error = e
    try:
        if jax.process_count() > 1:
            if multihost_utils.broadcast_one_to_all(np.int32(error is not None)) and error is None:
                error = WorkdirLockedError(f"workdir {workdir} is locked (process 0 says by whom)")
            if error is None:
                _check_shared(path, int(multihost_utils.broadcast_one_to_all(np.int32(run))))
        if error is not None:
            raise error
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # a clean end leaves no lock behind
            os.close(fd)  # releases the flock


def _check_shared(path: Path, run: int) -> None:
    """Every process sees the lock file process 0 wrote for `run`, or all stop (ConfigError)."""
    for _ in range(SHARED_CHECK_ROUNDS):
        mine = np.int32(_holder(path).get("run") == run)
        seen = np.ravel(multihost_utils.process_allgather(mine))
        if seen.all():
            return
        time.sleep(1.0)
    blind = ", ".join(str(i) for i in np.flatnonzero(seen == 0))
    raise ConfigError(f"workdir {path.parent} is not one directory shared by every process: "
                      f"process(es) {blind} do not see the lock file that process 0 wrote there; "
                      "give every process the same --workdir on a filesystem that all hosts "
                      "share (process 0 writes the checkpoints, every process reads them)")


def check_writable(workdir: Path) -> None:
    """Fails at start-up, not at the first save, when the workdir cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{jax.process_index()}.{os.getpid()}"  # one per process
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise ConfigError(f"workdir {workdir} is on a full disk ({e.strerror}); free some "
                              "space there or pick another --workdir") from None
        raise ConfigError(f"workdir {workdir} is not writable ({e.strerror or e}); pick another "
                          "--workdir or fix its permissions") from None


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_space(workdir: Path, need: int) -> None:
    """Refuses a disk without room for one more checkpoint of `need` bytes (Orbax deletes the oldest
    only after writing the new one), rather than fail hours in."""
    free = free_bytes(workdir)
    if free < need:
        raise ConfigError(f"workdir {workdir} has {free >> 20} MiB free but one checkpoint of this "
                          f"run takes {need >> 20} MiB; free some space or pick another --workdir")
