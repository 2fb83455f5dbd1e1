"""Train STTN ResNet-18 from a config file.

  python train.py --config configs/imagenet_resnet18_bwx2.py --workdir DIR [--config.key=value ...]

Running the same command on the workdir of an interrupted run resumes it. Multi-host launches
pass --coordinator_address/--num_processes/--process_id where the cluster does not provide them.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster "
                  "auto-detection (TPU pods, SLURM) even without the three flags above.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sttn_jax import cli_support

    cli_support.setup_logging()
    cli_support.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                 FLAGS.distributed)
    from sttn_jax import train_loop

    with cli_support.one_line_errors():
        result = train_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    logging.getLogger("sttn_jax").info("done: %s", result)


if __name__ == "__main__":
    from sttn_jax.cli_support import check_config_overrides

    check_config_overrides(sys.argv)
    app.run(main)
