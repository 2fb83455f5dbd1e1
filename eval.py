"""Evaluate a bwx2 or ternary STTN model (or the ResNet-50 teacher) on a TFDS split.

  python eval.py --checkpoint SRC [--config configs/X.py] [--arch A] [--split S] [--step N]
                 [--out FILE.json] [--config.key=value ...]

SRC, any model file sttn-jax reads: a training workdir (its best checkpoint, or that of --step N),
a model checkpoint directory (converted or merged: merge.py --out), a packed 2-bit file (merge.py
--packed, .sttn) or an original PyTorch .pth/.pth.tar; --arch only checks the arch SRC holds.
Dataset, split, image size, data directory, eval batch size (divisible by the device count) and
dtype come from --config if given, else from the training run SRC records (a workdir's
config.json, the copy merge.py keeps in its outputs), else configs/default.py; --print_config shows
the result. --config.inference_dtype=int8 runs a merged ternary model's block convolutions in
integers. Uses every device of every process. Prints top-1, top-5 and the mean cross-entropy
(--out: as JSON, top-1/top-5 as fractions). Errors print one line `error: ...`, exit status 2.
"""
from absl import flags

from sttn_jax import archs, cli

cli.define_config_flag(str(cli.DEFAULT_CONFIG), "Config file (default: the config of the run "
                       "the model came from, where it records one, else configs/default.py).")
flags.DEFINE_string("checkpoint", None, "The model: a training workdir, a model checkpoint "
                    "directory (converted, merged), a packed .sttn file or a .pth/.pth.tar file.")
flags.DEFINE_enum("arch", None, list(archs.ARCHS), "The arch SRC must hold (default: any).")
flags.DEFINE_string("split", None, "TFDS split (default: config.eval_split).")
flags.DEFINE_integer("step", None, "Workdir only: evaluate the checkpoint of this step.")
flags.DEFINE_string("out", None, "Write the metrics as JSON to this file.")
cli.define_distributed_flags()
cli.define_compilation_cache_flag()
FLAGS = flags.FLAGS


def main(argv):
    if FLAGS.print_config and FLAGS.checkpoint is None:
        cli.print_config(FLAGS.config)
        return
    cli.check_output_file(FLAGS.out, "out")
    cli.start(argv)
    import jax

    from sttn_jax import errors, model_io

    with cli.one_line_errors():
        loaded = model_io.load(FLAGS.checkpoint, arch=FLAGS.arch, step=FLAGS.step)
        config, origin = cli.config_for(FLAGS["config"], loaded)
        if FLAGS.print_config:
            cli.print_config(config)
            return
        from sttn_jax import evaluation, json_io  # after the model is read: it imports TensorFlow
        try:
            result = evaluation.evaluate_checkpoint(config, FLAGS.checkpoint, split=FLAGS.split,
                                                    loaded=loaded)
        except errors.DatasetNotPreparedError as e:
            if origin is not None:
                raise
            raise errors.DatasetNotPreparedError(
                f"{e} Or, if the model was trained on other data: pass that run's --config "
                f"FILE ({loaded.path} records no training config)") from None
    if jax.process_index() == 0:
        print(evaluation.format_result(result))
        if FLAGS.out:
            json_io.write_json(result, FLAGS.out)
            print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main, required=("checkpoint",))
