"""A process that joins a multi-process run through the tools' own start-up (`cli.start`: the
distributed flags, the heartbeat timeout) and then waits outside any collective: what the others
do when such a process dies is JAX's runtime's answer, not a collective's error."""
import sys
import time

from sttn_jax import cli

cli.define_distributed_flags()
cli.define_compilation_cache_flag()


def main(argv):
    cli.start(argv)
    print("joined", file=sys.stderr, flush=True)
    time.sleep(600)


if __name__ == "__main__":
    cli.run(main)
