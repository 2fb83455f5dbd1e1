"""Merge a trained resnet18_bwx2 (binary weight pairs) into resnet18_ter (ternary weights).

  python merge.py --checkpoint SRC --out DST [--torch_out FILE.pth.tar] [--packed FILE.sttn]
                  [--step N] [--batch 8] [--image_size S] [--seed 0] [--noplot]

SRC: a training workdir (its best evaluated checkpoint, else the newest, or that of --step N), an
original resnet18_bwx2 .pth.tar, or a model checkpoint directory holding a resnet18_bwx2. DST: a
model checkpoint directory of resnet18_ter (replacing one there) for eval.py and `python -m
sttn_jax.interop`, with merge_report.json and .png (per-layer ternary levels, alphas, parameter
counts, size, MACs). --torch_out also writes the original's format; --packed a packed 2-bit file.

First both models run on --batch random normal images of --image_size (default: the workdir's
training image size, else 224) in float32; if the logits differ by more than 1e-5 relative
(max|delta| / max|bwx2 logit|), nothing is written and the exit status is 1. Outputs that cannot be
written (no torch for --torch_out, a clashing or unwritable path) are refused before any work, and
every output is written aside and renamed into place only when all are complete. Bad input prints
one line `error: ...` and exits with status 2.
"""
from absl import flags

from sttn_jax import cli

flags.DEFINE_string("checkpoint", None, "Training workdir, resnet18_bwx2 .pth/.pth.tar, or model "
                    "checkpoint directory.")
flags.DEFINE_string("out", None, "Model checkpoint directory to write (resnet18_ter).")
flags.DEFINE_string("torch_out", None, "Also write the original's resnet18_ter .pth.tar here.")
flags.DEFINE_string("packed", None, "Also write the packed 2-bit model file here.")
flags.DEFINE_integer("step", None, "Workdir only: merge the checkpoint of this step.")
flags.DEFINE_integer("batch", 8, "Images in the logit check.")
flags.DEFINE_integer("image_size", None, "Check images and report MACs at this size (default: the "
                     "workdir's config image_size, else 224).")
flags.DEFINE_integer("seed", 0, "Seed of the check images.")
flags.DEFINE_bool("plot", True, "Write merge_report.png.")
cli.define_compilation_cache_flag()
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv, distributed=False)
    from sttn_jax import errors, merging

    with cli.one_line_errors({errors.MergeCheckError: 1}):
        merging.merge_checkpoint(FLAGS.checkpoint, FLAGS.out, torch_out=FLAGS.torch_out,
                                 packed=FLAGS.packed, step=FLAGS.step, batch=FLAGS.batch,
                                 image_size=FLAGS.image_size, seed=FLAGS.seed, plot=FLAGS.plot)


if __name__ == "__main__":
    cli.run(main, required=("checkpoint", "out"))
