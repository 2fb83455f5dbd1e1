"""`make demo`: the whole STTN workflow on the embedded digits, on a CPU, in minutes.

Train resnet18_bwx2 (configs/demo.py) -> merge the binary pairs into ternary kernels -> evaluate the
bwx2 and the ternary model on the held-out split -> print a short table and write
`summary.json` with the merge report and plots beside it. Same TFDS pipeline, training, merge and
evaluation code as ImageNet.

  python -m sttn_jax.demo [--workdir runs/demo] [--config.key=value ...]
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("sttn_jax")


def run(config, workdir="runs/demo") -> dict:
    from sttn_jax import evaluation, merging, train_loop

    workdir = Path(workdir)
    t0 = time.perf_counter()
    train_dir, merged_dir = workdir / "train", workdir / "ternary"
    train_result = train_loop.train_and_evaluate(config, train_dir)
    t_train = time.perf_counter() - t0
    merged = merging.merge_checkpoint(train_dir, merged_dir, image_size=config.image_size)
    bwx2 = evaluation.evaluate_checkpoint(config, train_dir, arch="resnet18_bwx2")
    ternary = evaluation.evaluate_checkpoint(config, merged_dir, arch="resnet18_ter")
    rep = merged.report
    summary = {
        "bwx2_top1": bwx2["top1"], "ternary_top1": ternary["top1"],
        "bwx2_top5": bwx2["top5"], "ternary_top5": ternary["top5"],
        "bwx2_loss": bwx2["loss"], "ternary_loss": ternary["loss"],
        "num_test_examples": ternary["num_examples"],
        "identical_top1": bwx2["top1"] == ternary["top1"],
        "train_steps": train_result["step"],
        "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "merge_check": merged.check.as_dict(),
        "merge_report": str(merged_dir / "merge_report.json"),
        "merge_plot": str(merged.plot) if merged.plot else None,
        "sparsity": rep["overall"]["sparsity"],
        "size_float32_bytes": rep["size_bytes"]["float32"],
        "size_packed_ternary_bytes": rep["size_bytes"]["packed_ternary"],
        "bwx2_checkpoint": str(train_dir), "ternary_checkpoint": str(merged_dir),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary, workdir))
    return summary


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _mib(x):
    return "n/a" if x is None else f"{x / 2**20:.2f} MiB"


def format_summary(s: dict, workdir: Path) -> str:
    rows = [
        ("top-1, bwx2 (two binary convs per layer)", _pct(s["bwx2_top1"])),
        ("top-1, merged ternary", _pct(s["ternary_top1"])),
        ("identical", "yes" if s["identical_top1"] else "NO"),
        ("zeros in the ternary kernels (sparsity)", _pct(s["sparsity"])),
        ("model size, float32", _mib(s["size_float32_bytes"])),
        ("model size, packed 2-bit ternary", _mib(s["size_packed_ternary_bytes"])),
        ("test examples", str(s["num_test_examples"])),
        ("time (train / all)", f"{s['train_seconds']:.0f} s / {s['total_seconds']:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["", "STTN demo: ResNet-18 on the embedded digits (32x32), CPU", "-" * (width + 16)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["-" * (width + 16),
              f"summary:      {workdir / 'summary.json'}",
              f"merge report: {s['merge_report']} (table, JSON) and {s['merge_plot']} (plot)",
              f"checkpoints:  {s['bwx2_checkpoint']} (bwx2 workdir), {s['ternary_checkpoint']} (ternary)",
              f"TensorBoard:  tensorboard --logdir {workdir / 'train' / 'tensorboard'}", ""]
    return "\n".join(lines)


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config file.", lock_config=True)
    flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes everything.")

    def _main(_):
        from sttn_jax import cli_support

        cli_support.setup_logging()
        with cli_support.one_line_errors():
            run(flags.FLAGS.config, flags.FLAGS.workdir)

    from sttn_jax.cli_support import check_config_overrides

    check_config_overrides(sys.argv if argv is None else argv, "configs/demo.py")
    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
