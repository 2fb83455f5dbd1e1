"""`python -m sttn_jax.interop`: convert / export the original PyTorch checkpoints, check parity.

  convert SRC.pth.tar DST [--arch A]     PyTorch checkpoint -> sttn-jax model checkpoint directory
  export SRC DST.pth.tar [--arch A]      any model source (model checkpoint, workdir, .pth) ->
                                         PyTorch file that the original code loads unchanged
  parity --checkpoint SRC [--arch A] [--batch N] [--image_size S] [--seed K]
         [--reference_logits LOGITS.npy --inputs IMAGES.npy] [--out FILE.json]
                                         JAX vs the PyTorch reference on one batch, float64 and
                                         float32; exit 1 when float64 relative error > 1e-8

Errors print one line `error: ...` and exit with status 2.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from absl import flags

from sttn_jax import archs, cli, json_io

COMMANDS = {"convert": 2, "export": 2, "parity": 0}  # command -> number of arguments
flags.DEFINE_enum("arch", None, list(archs.ARCHS), "The arch the source must hold (default: "
                  "whatever it holds).")
flags.DEFINE_string("checkpoint", None, "parity: model checkpoint directory, workdir or .pth file.")
flags.DEFINE_integer("batch", 2, "parity: number of random images.")
flags.DEFINE_integer("image_size", 224, "parity: image side.")
flags.DEFINE_integer("seed", 0, "parity: seed of the random images.")
flags.DEFINE_string("inputs", None, "parity: images (.npy, NCHW as the original feeds them; NHWC "
                    "accepted) instead of random ones.")
flags.DEFINE_string("reference_logits", None, "parity: logits (.npy) of --inputs to compare "
                    "against instead of running PyTorch.")
flags.DEFINE_string("out", None, "parity: also write the results as JSON to this file.")
cli.define_compilation_cache_flag()
FLAGS = flags.FLAGS


def _load_npy(path, what):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the {what} as a .npy array ({e})") from None


def convert(command, src, dst) -> int:
    """convert: to a model checkpoint directory; export: to a PyTorch file."""
    from sttn_jax import interop, model_io

    loaded = model_io.load(src, arch=FLAGS.arch)
    if command == "convert":
        out = Path(dst).absolute()
        if out.exists() and (not out.is_dir() or any(out.iterdir())) \
                and not model_io.is_model_checkpoint(out):
            raise ValueError(f"{dst} exists and is not a model checkpoint; give a new directory "
                             "(an existing model checkpoint is replaced)")
        with json_io.written_aside(out) as staged:
            model_io.save(staged, loaded.variables, loaded.arch,
                          extra={"converted_from": loaded.path})
            if out.exists():
                shutil.rmtree(out)
    else:
        out = interop.save_torch_checkpoint(loaded.variables, loaded.arch, dst)
    print(f"{command}ed {src} ({loaded.arch}) -> {out}")
    return 0


def parity() -> int:
    from sttn_jax import model_io
    from sttn_jax.interop import parity as parity_lib

    if FLAGS.checkpoint is None:
        raise ValueError("parity needs --checkpoint (a model checkpoint, workdir or .pth file)")
    if FLAGS.reference_logits and not FLAGS.inputs:
        raise ValueError("--reference_logits needs --inputs (the images those logits came from)")
    if FLAGS.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {FLAGS.batch}")
    loaded = model_io.load(FLAGS.checkpoint, arch=FLAGS.arch)
    if not FLAGS.inputs and (problem := archs.image_size_problem(FLAGS.image_size, loaded.arch)):
        raise ValueError(f"--image_size {FLAGS.image_size}: {problem}")
    images = (parity_lib.as_nchw(_load_npy(FLAGS.inputs, "inputs")) if FLAGS.inputs
              else parity_lib.random_images(FLAGS.batch, FLAGS.image_size, FLAGS.seed))
    ref = _load_npy(FLAGS.reference_logits, "reference logits") if FLAGS.reference_logits else None
    results = parity_lib.run_parity(loaded.variables, loaded.arch, images, ref)
    source = (f"logits from {FLAGS.reference_logits}" if ref is not None
              else "the PyTorch reference (sttn_jax.interop.reference)")
    print(parity_lib.format_report(results, loaded.arch, images.shape, source))
    if FLAGS.out:
        with json_io.written_aside(FLAGS.out) as staged:
            staged.write_text(json.dumps(parity_lib.as_json(results, loaded.arch, images.shape,
                                                            source), indent=2))
        print(f"wrote {FLAGS.out}")
    return 0 if parity_lib.passed(results) else 1


def main(argv):
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if command not in COMMANDS:
        cli.usage_error(f"give a command: python -m sttn_jax.interop {{{','.join(COMMANDS)}}} "
                        "... (--help says what each takes)")
    if len(args) != COMMANDS[command]:
        what = {"convert": "SRC.pth.tar DST", "export": "SRC DST.pth.tar"}.get(command, "no")
        cli.usage_error(f"{command} takes {what} arguments, got {len(args)}"
                        f"{': ' + ' '.join(args) if args else ''} (--help says what each takes)")
    if command == "parity":
        cli.check_output_file(FLAGS.out, "out")
    cli.setup_logging()
    cli.enable_compilation_cache(FLAGS.compilation_cache_dir)
    with cli.one_line_errors():
        try:
            code = parity() if command == "parity" else convert(command, *args)
        except (ValueError, OSError, ImportError) as e:
            print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
            code = 2
    sys.exit(code)


if __name__ == "__main__":
    cli.run(main)
