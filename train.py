"""Train STTN ResNet-18 from a config file: the command line of
`sttn_jax.train_loop.train_and_evaluate` (library code calls that).

  python train.py --config configs/imagenet_resnet18_bwx2.py --workdir DIR [--config.key=value ...]

Running the same command on the workdir of an interrupted run resumes it (SIGTERM saves and exits
with status 143); on a finished run it changes nothing and says so. Multi-host launches pass
--coordinator_address/--num_processes/--process_id where the cluster does not provide them. Log
lines also go to DIR/train.log. --print_config prints the config with the overrides and exits.
Mistakes print one line `error: ...` and exit with status 2.
"""
import sys

from absl import flags, logging

from sttn_jax import cli

cli.define_config_flag(None, "Path to a config file in configs/.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and TensorBoard events.")
flags.DEFINE_bool("take_over_lock", False, "Take over the workdir's lock when it was left by a "
                  "run on another host that cannot be checked from here (that run must be over).")
cli.define_distributed_flags()
cli.define_compilation_cache_flag()
FLAGS = flags.FLAGS


def main(argv):
    if FLAGS.print_config:
        cli.print_config(FLAGS.config)
        return
    cli.start(argv)
    from sttn_jax import train_loop

    with cli.one_line_errors():
        try:
            result = train_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                                   take_over_lock=FLAGS.take_over_lock)
        except train_loop.Preempted as e:
            print(f"stopped: {e}; run the same command to resume", file=sys.stderr)
            sys.exit(143)  # 128 + SIGTERM, what a scheduler expects of a terminated job
    logging.info("done: %s", result)


if __name__ == "__main__":
    cli.run(main, required=("config", "workdir"))
