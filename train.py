"""Train STTN ResNet-18 from a config file.

  python train.py --config configs/imagenet_resnet18_bwx2.py --workdir DIR [--config.key=value ...]

Running the same command on the workdir of an interrupted run resumes it. Multi-host launches
pass --coordinator_address/--num_processes/--process_id where the cluster does not provide them.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from sttn_jax import cli_support

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and TensorBoard events.")
cli_support.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cli_support.setup_logging()
    cli_support.init_distributed_from_flags()
    from sttn_jax import train_loop

    with cli_support.one_line_errors():
        try:
            result = train_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        except train_loop.Preempted as e:
            print(f"stopped: {e}; run the same command to resume", file=sys.stderr)
            sys.exit(143)  # 128 + SIGTERM, what a scheduler expects of a terminated job
    logging.getLogger("sttn_jax").info("done: %s", result)


if __name__ == "__main__":
    cli_support.check_config_overrides(sys.argv)
    app.run(main)
