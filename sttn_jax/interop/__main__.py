"""`python -m sttn_jax.interop`: convert / export the original PyTorch checkpoints, check parity.

  convert SRC.pth.tar DST [--arch A]     PyTorch checkpoint -> sttn-jax model checkpoint directory
  export SRC DST.pth.tar [--arch A]      model checkpoint directory (or a .pth) -> PyTorch file that
                                         the original code loads unchanged
  parity --checkpoint SRC [--arch A] [--batch N] [--image-size S] [--seed K]
         [--reference-logits LOGITS.npy --inputs IMAGES.npy]
                                         JAX vs the PyTorch reference on one batch, float64 and
                                         float32; exit 1 when float64 relative error > 1e-8

Errors print one line `error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

ARCHS = ("resnet18_bwx2", "resnet18_ter", "resnet50")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sttn_jax.interop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{convert,export,parity}")

    c = sub.add_parser("convert", help="PyTorch checkpoint -> sttn-jax model checkpoint")
    c.add_argument("src", help="original checkpoint (.pth/.pth.tar): training checkpoint, "
                               "{'state_dict'} or bare state_dict, with or without 'module.'")
    c.add_argument("dst", help="model checkpoint directory to write (replaced if present)")
    c.add_argument("--arch", choices=ARCHS, help="default: inferred from the keys")

    e = sub.add_parser("export", help="model checkpoint (or .pth) -> PyTorch .pth.tar")
    e.add_argument("src", help="model checkpoint directory, or a PyTorch checkpoint file")
    e.add_argument("dst", help="PyTorch file to write ({'state_dict'} with 'module.' keys)")
    e.add_argument("--arch", choices=ARCHS, help="default: from the checkpoint")

    q = sub.add_parser("parity", help="logits of JAX vs the PyTorch reference on one batch")
    q.add_argument("--checkpoint", required=True,
                   help="model checkpoint directory or PyTorch checkpoint file")
    q.add_argument("--arch", choices=ARCHS, help="default: from the checkpoint")
    q.add_argument("--batch", type=int, default=2, help="random images (default 2)")
    q.add_argument("--image-size", type=int, default=224, help="default 224")
    q.add_argument("--seed", type=int, default=0, help="seed of the random images (default 0)")
    q.add_argument("--inputs", help="images (.npy, NCHW as the original feeds them; NHWC accepted)")
    q.add_argument("--reference-logits",
                   help="logits (.npy) of --inputs to compare against instead of running PyTorch")
    return p


def _convert(args) -> int:
    from sttn_jax import checkpoints, interop

    variables, arch = interop.load_torch_checkpoint_with_arch(args.src, args.arch)
    out = checkpoints.save_model(args.dst, variables, arch, extra={"converted_from": str(args.src)})
    print(f"converted {args.src} ({arch}) -> {out}")
    return 0


def _export(args) -> int:
    from sttn_jax import interop

    variables, arch = interop.load_variables(args.src, args.arch)
    out = interop.save_torch_checkpoint(variables, arch, args.dst)
    print(f"exported {args.src} ({arch}) -> {out}")
    return 0


def _load_npy(path, what):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the {what} as a .npy array ({e})") from None


def _parity(args) -> int:
    from sttn_jax import interop
    from sttn_jax.interop import parity

    if args.reference_logits and not args.inputs:
        raise ValueError("--reference-logits needs --inputs (the images those logits came from)")
    if args.batch < 1 or args.image_size < 32:
        raise ValueError("--batch must be >= 1 and --image-size >= 32")
    variables, arch = interop.load_variables(args.checkpoint, args.arch)
    if args.inputs:
        images = parity.as_nchw(_load_npy(args.inputs, "inputs"))
    else:
        images = parity.random_images(args.batch, args.image_size, args.seed)
    ref = _load_npy(args.reference_logits, "reference logits") if args.reference_logits else None
    results = parity.run_parity(variables, arch, images, ref)
    source = (f"logits from {args.reference_logits}" if ref is not None
              else "the PyTorch reference (sttn_jax.interop.reference)")
    print(parity.format_report(results, arch, images.shape, source))
    return 0 if parity.passed(results) else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sttn_jax.checkpoints import CheckpointError

    try:
        return {"convert": _convert, "export": _export, "parity": _parity}[args.command](args)
    except (CheckpointError, ValueError, OSError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
