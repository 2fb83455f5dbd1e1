"""Waiting for the other processes of a multi-process run without XLA's 30-second limit.

The first time a program's collectives run, XLA's CPU collectives (Gloo) give the processes 30 s,
a fixed limit, to meet ("Gloo context initialization failed: ... GetKeyValue() timed out"); a
process arriving later fails them all. Processes do arrive that far apart: only process 0 writes
JAX's compilation cache, so on a resume it loads the train step in a second while the others
compile it again (measured: a process held 45 s before its first step stopped both, exit 1);
process 0 alone also builds the data sets it can make and reads the checkpoints through before
the others learn which step to restore. JAX's coordination service (the one behind
jax.distributed) has barriers that wait as long as asked, through Orbax's `multihost` helpers;
its heartbeats still stop everyone if a process dies while the others wait."""
import itertools
from typing import Callable

import jax

WAIT_SECONDS = 3600  # a wait that long is a hung process: a dead one is caught by the heartbeats

_barriers = itertools.count()  # every process passes the same barriers in the same order


def wait_for_all(name: str) -> None:
    """Returns once every process has called it (at once with one process)."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost  # not imported by the one-process tools (benchmarks)

    multihost.get_barrier_sync_fn()(key=f"sttn_jax:{name}:{next(_barriers)}",
                                    timeout_ms=WAIT_SECONDS * 1000)


def first_call_together(jitted, name: str) -> Callable:
    """`jitted` (a jax.jit function) whose first call compiles it for its arguments, then waits
    for every process to have compiled it before it runs; `jitted` itself with one process."""
    if jax.process_count() == 1:
        return jitted
    compiled = []

    def call(*args):
        if not compiled:
            jitted.lower(*args).compile()  # jitted(*args) below reuses this executable
            wait_for_all(f"compiled {name}")
            compiled.append(True)
        return jitted(*args)

    return call
