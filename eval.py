"""Evaluate a bwx2 or ternary STTN model (or the ResNet-50 teacher) on a TFDS split.

  python eval.py --checkpoint SRC [--config configs/X.py] [--arch A] [--split S] [--step N]
                 [--output FILE.json] [--config.key=value ...]

SRC: a training workdir (its best checkpoint, or that of --step N), a model checkpoint directory
(converted, merged) or an original PyTorch .pth/.pth.tar; --arch only checks the arch SRC holds.
Dataset, split, image size, eval batch size (divisible by the device count) and dtype come from
--config, else the workdir's config.json, else configs/default.py. --config.inference_dtype=int8
runs a merged ternary model's block convolutions in integers. Uses every device of every process.
Prints top-1, top-5 and the mean cross-entropy (--output: as JSON, top-1/top-5 as fractions).
Errors print one line `error: ...` and exit with status 2.
"""
from absl import flags
from ml_collections import config_flags

from sttn_jax import archs, cli

config_flags.DEFINE_config_file("config", str(cli.DEFAULT_CONFIG), "Config file (default: "
                                "the workdir's config.json, else configs/default.py).")
flags.DEFINE_string("checkpoint", None, "Training workdir, model checkpoint directory or .pth file.")
flags.DEFINE_enum("arch", None, list(archs.ARCHS), "The arch SRC must hold (default: any).")
flags.DEFINE_string("split", None, "TFDS split (default: config.eval_split).")
flags.DEFINE_integer("step", None, "Workdir only: evaluate the checkpoint of this step.")
flags.DEFINE_string("output", None, "Write the metrics as JSON to this file.")
cli.define_distributed_flags()
cli.define_compilation_cache_flag()
flags.mark_flags_as_required(["checkpoint"])
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv)
    import jax

    from sttn_jax import evaluation, json_io

    with cli.one_line_errors():
        config = cli.config_for(FLAGS["config"], FLAGS.checkpoint)
        result = evaluation.evaluate_checkpoint(config, FLAGS.checkpoint, arch=FLAGS.arch,
                                                split=FLAGS.split, step=FLAGS.step)
    if jax.process_index() == 0:
        print(evaluation.format_result(result))
        if FLAGS.output:
            json_io.write_json(result, FLAGS.output)
            print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    cli.run(main)
