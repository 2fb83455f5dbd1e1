"""Evaluate a bwx2 or ternary STTN model (or the ResNet-50 teacher) on a TFDS split.

  python eval.py --config configs/X.py --checkpoint SRC [--arch A] [--split S] [--step N]
                 [--output FILE.json] [--config.key=value ...]

SRC: a training workdir (its best checkpoint; --step N picks a step), a model checkpoint
directory (converted, merged) or an original PyTorch .pth/.pth.tar. The arch is read from SRC;
--arch only checks it. Dataset, split (default config.eval_split), image size, eval batch size
(divisible by the device count) and dtype come from the config. Every device of every process
is used. Prints top-1, top-5 and the mean cross-entropy; --output writes them as JSON
{"top1", "top5", "loss", "num_examples", "arch", "checkpoint", ...} (top-1/top-5 as fractions).
Errors print one line `error: ...` and exit with status 2.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from sttn_jax import cli_support
from sttn_jax.models import ARCHS

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
flags.DEFINE_string("checkpoint", None, "Training workdir, model checkpoint directory or .pth file.")
flags.DEFINE_enum("arch", None, ARCHS, "The arch SRC must hold (default: whatever it holds).")
flags.DEFINE_string("split", None, "TFDS split (default: config.eval_split).")
flags.DEFINE_integer("step", None, "Workdir only: evaluate the checkpoint of this step.")
flags.DEFINE_string("output", None, "Write the metrics as JSON to this file.")
cli_support.define_distributed_flags()
flags.mark_flags_as_required(["config", "checkpoint"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cli_support.setup_logging()
    cli_support.init_distributed_from_flags()
    import jax

    from sttn_jax import evaluation

    with cli_support.one_line_errors():
        result = evaluation.evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint, arch=FLAGS.arch,
                                                split=FLAGS.split, step=FLAGS.step)
    if jax.process_index() == 0:
        print(evaluation.format_result(result))
        if FLAGS.output:
            evaluation.write_result(result, FLAGS.output)
            print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    cli_support.check_config_overrides(sys.argv)
    app.run(main)
