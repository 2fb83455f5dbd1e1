"""`make demo`: the whole STTN workflow on the embedded digits, on a CPU, in minutes.

Train resnet18_bwx2 (configs/demo.py) -> merge it into ternary kernels -> evaluate bwx2, ternary
and int8 on the held-out split -> print a short table, write `summary.json` beside the merge
report and plots. Same TFDS pipeline, training, merge and evaluation code as ImageNet.

  python -m sttn_jax.demo [--workdir runs/demo] [--config.key=value ...] [--print_config]
"""

import time
from pathlib import Path

from absl import flags

from sttn_jax import cli


def run(config, workdir="runs/demo") -> dict:
    from sttn_jax import evaluation, json_io, merging, train_loop

    workdir = Path(workdir)
    t0 = time.perf_counter()
    train_dir, merged_dir = workdir / "train", workdir / "ternary"
    train_result = train_loop.train_and_evaluate(config, train_dir)
    t_train = time.perf_counter() - t0
    packed_file = merged_dir.with_name("ternary.sttn")
    merged = merging.merge_checkpoint(train_dir, merged_dir, packed=packed_file,
                                      image_size=config.image_size)
    bwx2 = evaluation.evaluate_checkpoint(config, train_dir, arch="resnet18_bwx2")
    ternary = evaluation.evaluate_checkpoint(config, merged_dir, arch="resnet18_ter")
    int8_config = config.copy_and_resolve_references()
    int8_config.inference_dtype = "int8"
    int8 = evaluation.evaluate_checkpoint(int8_config, packed_file, arch="resnet18_ter")
    rep = merged.report
    summary = {
        "bwx2_top1": bwx2["top1"], "ternary_top1": ternary["top1"], "int8_top1": int8["top1"],
        "bwx2_top5": bwx2["top5"], "ternary_top5": ternary["top5"],
        "bwx2_loss": bwx2["loss"], "ternary_loss": ternary["loss"],
        "num_test_examples": ternary["num_examples"],
        "identical_top1": bwx2["top1"] == ternary["top1"] == int8["top1"],
        "train_steps": train_result["step"],
        "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "merge_check": merged.check.as_dict(),
        "merge_report": str(merged_dir / "merge_report.json"),
        "merge_plot": str(merged.plot) if merged.plot else None,
        "sparsity": rep["overall"]["sparsity"],
        "size_float32_bytes": rep["size_bytes"]["float32"],
        "size_packed_ternary_bytes": rep["size_bytes"]["packed_ternary"],
        "packed_file": str(packed_file), "packed_file_bytes": packed_file.stat().st_size,
        "bwx2_checkpoint": str(train_dir), "ternary_checkpoint": str(merged_dir),
    }
    json_io.write_json(summary, workdir / "summary.json")
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
        ("top-1, merged ternary, int8 inference", _pct(s["int8_top1"])),
        ("identical", "yes" if s["identical_top1"] else "NO"),
        ("zeros in the ternary kernels (sparsity)", _pct(s["sparsity"])),
        ("model size, float32", _mib(s["size_float32_bytes"])),
        ("model size, packed 2-bit ternary (file)", _mib(s["packed_file_bytes"])),
        ("test examples", str(s["num_test_examples"])),
        ("time (train / all)", f"{s['train_seconds']:.0f} s / {s['total_seconds']:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["", "STTN demo: ResNet-18 on the embedded digits (32x32), CPU", "-" * (width + 16)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["-" * (width + 16),
              f"summary:      {workdir / 'summary.json'}",
              f"merge report: {s['merge_report']} (table, JSON) and {s['merge_plot']} (plot)",
              f"checkpoints:  {s['bwx2_checkpoint']} (bwx2 workdir), {s['ternary_checkpoint']} (ternary), "
              f"{s['packed_file']} (packed)",
              f"TensorBoard:  tensorboard --logdir {workdir / 'train' / 'tensorboard'}", ""]
    return "\n".join(lines)


def main(argv=None):
    cli.define_config_flag(str(cli.DEFAULT_CONFIG.with_name("demo.py")), "Demo config file.")
    flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes everything.")
    cli.define_compilation_cache_flag()

    def _main(args):
        if flags.FLAGS.print_config:
            cli.print_config(flags.FLAGS.config)
            return
        cli.start(args, distributed=False)
        with cli.one_line_errors():
            run(flags.FLAGS.config, flags.FLAGS.workdir)

    cli.run(_main, argv=argv)


if __name__ == "__main__":
    main()
