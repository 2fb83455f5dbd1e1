"""Merge a trained resnet18_bwx2 (binary weight pairs) into resnet18_ter (ternary weights).

  python merge.py --checkpoint SRC --out DST [--torch-out FILE.pth.tar] [--step N]
                  [--batch 8] [--image-size S] [--seed 0]

SRC: a training workdir (its best checkpoint, WORKDIR/best; the newest in WORKDIR/checkpoints when
best/ is empty; --step N picks step N), or an original resnet18_bwx2 .pth.tar, or a model
checkpoint directory holding a resnet18_bwx2. DST: a new model checkpoint directory (Orbax) of
resnet18_ter that eval.py and `python -m sttn_jax.interop` read, with merge_report.json and
merge_report.png (per-layer ternary levels, alphas, parameter counts, size, MACs); an existing
model checkpoint there is replaced. --torch-out also writes the original's ternary format.

Before writing anything, both models run on --batch random normal images (default 8) of
--image-size (default: the workdir's training image size, else 224) in float32; when the logits
differ by more than 1e-5 relative (max|delta| / max|bwx2 logit|) nothing is written and the exit
status is 1. Bad input prints one line `error: ...` and exits with status 2.
"""
import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merge.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training workdir, resnet18_bwx2 .pth/.pth.tar, or model checkpoint dir")
    p.add_argument("--out", required=True, help="model checkpoint directory to write (resnet18_ter)")
    p.add_argument("--torch-out", help="also write the original's resnet18_ter .pth.tar here")
    p.add_argument("--step", type=int, help="workdir only: merge the checkpoint of this step")
    p.add_argument("--batch", type=int, default=8, help="images in the logit check (default 8)")
    p.add_argument("--image-size", type=int,
                   help="check images and report MACs at this size (default: the workdir's "
                        "config image_size, else 224)")
    p.add_argument("--seed", type=int, default=0, help="seed of the check images (default 0)")
    p.add_argument("--no-plot", action="store_true", help="skip merge_report.png")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sttn_jax import cli_support

    cli_support.setup_logging()
    from sttn_jax import merging

    with cli_support.one_line_errors():
        try:
            merging.merge_checkpoint(args.checkpoint, args.out, torch_out=args.torch_out,
                                     step=args.step, batch=args.batch, image_size=args.image_size,
                                     seed=args.seed, plot=not args.no_plot)
        except merging.MergeCheckError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
