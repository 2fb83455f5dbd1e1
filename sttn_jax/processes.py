"""Waiting for the other processes of a multi-process run without the fixed 30 s that XLA's CPU
collectives give them to meet (process 0 alone may load the compilation cache, build data sets or
read checkpoints): the coordination service's barriers wait as long as asked."""
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
    """`jitted` whose first call compiles, then waits for every process to have compiled it."""
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
