"""XLA's plan for TPU slices, made on a machine without a TPU: the training and evaluation steps of
configs/imagenet_resnet18_bwx2_tpu.py compiled for the chips of a slice, as one SPMD program over
all of them (a multi-host slice included), and what each chip needs and does per step.

    make tpu-plan                                 # v5e:2x2 and v5e:4x4 at the config's size
    python benchmarks/tpu_plan.py --topology v5p:2x2x2
    python benchmarks/tpu_plan.py --smoke         # 64x64, 2 per chip, v5e:2x2 (the test)

Needs libtpu importable (the TPU compiler; `make install-test` puts the version the pinned jax
asks for in .venv/tpu-compile, and `make tpu-plan` runs this with it on the path). The chips come
from `jax.experimental.topologies` (compile-only devices: nothing runs), the mesh over them is
`training.make_mesh`'s, and the steps are the ones train.py and eval.py run on it:
- train: `training.make_train_step` of the config (the resnet18_bwx2 student, the ResNet-50 teacher
  in train mode, Adam, BatchNorm statistics and gradients reduced over the data axis), the
  config's dtype, batch per chip (BATCH_PER_CHIP) times the slice's chips;
- eval: `training.make_eval_step` of merged resnet18_ter in each of benchmarks/run.py's inference
  modes (float32, bfloat16; int8 kernels and activations with float32 or bfloat16 float parts).

Per step and chip: XLA's memory plan (arguments, outputs, aliased (donated) buffers, temporaries;
planned peak against the chip's HBM), its cost analysis (FLOPs, bytes accessed), the collectives
of the compiled program (count and result bytes by kind), the compile time here, and the bound
the cost analysis implies: max(FLOPs / peak bfloat16 FLOP/s, bytes / HBM bandwidth). That bound is
XLA's estimate against the chip's datasheet, not a measurement. Writes one JSON per topology,
benchmarks/results/<date>_tpu-<topology>-plan.json (or under --output-dir). Exit status 1 if a step
does not fit its chip's HBM.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

# libtpu on a machine that is not a TPU VM: a host of its own (else it asks for the slice's
# accelerator type and workers, finds none, and logs errors that do not concern compiling), loaded
# beside any other process using libtpu (only one may by default; this one takes no chip).
for _key, _value in (("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_key, _value)

import jax  # noqa: E402

# benchmarks/run.py: the inference modes, the results' place; it puts the repository on sys.path
import run as bench  # noqa: E402
import xla_plan  # noqa: E402
from configs import imagenet_resnet18_bwx2_tpu as tpu_config  # noqa: E402
from sttn_jax import models, training  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU chip's datasheet figures (Google Cloud's TPU documentation)."""
    hbm_gib: float
    peak_bf16_tflops: float
    hbm_gb_per_s: float


CHIPS = {"v4": Chip(32, 275, 1200), "v5e": Chip(16, 197, 819), "v5p": Chip(95, 459, 2765),
         "v6e": Chip(32, 918, 1638)}
TOPOLOGIES = ("v5e:2x2", "v5e:4x4")  # one host of 4 chips; 4 hosts of 4 (the config's 16 chips)
SMOKE = {"image_size": 64, "batch_per_chip": 2, "topologies": ("v5e:2x2",), "eval": ("int8",)}
COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|"
                        r"collective-broadcast)(-start)?$")


def tpu_devices(topology: str) -> list:
    """The compile-only chips of `topology` (e.g. "v5e:2x2"), each with its host's process index."""
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def chip(topology: str) -> Chip:
    generation = topology.split(":")[0]
    if generation not in CHIPS:
        raise SystemExit(f"error: no datasheet figures for {generation!r} chips; use a topology "
                         f"of {', '.join(CHIPS)} (e.g. v5e:2x2)")
    return CHIPS[generation]


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "gb", "dtypes"}} of the collectives in optimized HLO (async ones counted
    once, at their start): "gb" the bytes of their results, "dtypes" their element types."""
    found = collections.defaultdict(lambda: {"count": 0, "gb": 0.0, "dtypes": set()})
    for line in hlo_text.splitlines():
        m = xla_plan.INSTRUCTION.match(line)
        kind = m and COLLECTIVE.match(m.group(3))
        if kind:
            entry = found[kind.group(1)]
            entry["count"] += 1
            entry["gb"] += xla_plan.type_bytes(m.group(2)) / 1e9
            entry["dtypes"].update(dtype for dtype, _ in xla_plan.ARRAY.findall(m.group(2)))
    return {kind: {**entry, "dtypes": sorted(entry["dtypes"])}
            for kind, entry in sorted(found.items())}


def summary(lowered, spec: Chip, per_chip: int) -> dict:
    """Compiles `lowered` and reports XLA's figures for one chip of the slice."""
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()  # a dict (a list of one in some jax versions)
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, accessed = cost["flops"], cost["bytes accessed"]
    compute_s = flops / (spec.peak_bf16_tflops * 1e12)
    memory_s = accessed / (spec.hbm_gb_per_s * 1e9)
    bound_s = max(compute_s, memory_s)
    result = {**xla_plan.memory(compiled), "compile_s": round(seconds, 1),
              "tflops": flops / 1e12, "accessed_gb": accessed / 1e9,
              "collectives": collectives(compiled.as_text()), "bound_ms": bound_s * 1e3,
              "bound_by": "compute" if compute_s >= memory_s else "memory",
              "bound_img_s": per_chip / bound_s}
    result["fits"] = result["planned_peak_gib"] < spec.hbm_gib
    return result


def plan_topology(topology: str, image_size: int, per_chip: int, eval_modes) -> dict:
    """The training step and the evaluation step in each of `eval_modes`, compiled for
    `topology`."""
    devices, spec = tpu_devices(topology), chip(topology)
    mesh = training.make_mesh(devices)
    config = tpu_config.get_config()
    config.image_size, config.batch_size = image_size, per_chip * len(devices)
    config.eval_batch_size = config.batch_size
    training.check_config(config, len(devices))
    result = {"topology": topology, "device": devices[0].device_kind, "chips": len(devices),
              "hosts": len({d.process_index for d in devices}), "chip": dataclasses.asdict(spec),
              "config": "configs/imagenet_resnet18_bwx2_tpu.py", "image_size": image_size,
              "batch_per_chip": per_chip, "global_batch": config.batch_size,
              "dtype": config.dtype, "jax_version": jax.__version__, "train": {}, "eval": {}}
    print(f"... {topology}: train", file=sys.stderr, flush=True)
    result["train"][config.dtype] = summary(xla_plan.lower_train_step(config, mesh), spec, per_chip)
    for mode in eval_modes:
        print(f"... {topology}: eval {mode}", file=sys.stderr, flush=True)
        module, variables = xla_plan.eval_model(mode, config.act_backend, config.stem_conv)
        config.arch = models.TERNARY
        step = training.make_eval_step(config, mesh, module)
        result["eval"][mode] = summary(step.lower(
            xla_plan.abstract(variables, training.replicated(mesh)),
            xla_plan.batch_specs(mesh, config.eval_batch_size, image_size, mask=True)),
            spec, per_chip)
    return result


def table(result: dict) -> str:
    lines = [f"XLA's plan for {result['topology']} ({result['chips']} x {result['device']}, "
             f"{result['hosts']} host{'s' if result['hosts'] > 1 else ''}), {result['image_size']}x"
             f"{result['image_size']}, {result['batch_per_chip']} per chip; per chip, compiled "
             "without a TPU (a bound, not a measurement)",
             f"{'step':<18}{'peak GiB':>9}{'of HBM':>8}{'TFLOP':>8}{'GB':>8}{'bound ms':>10}"
             f"{'img/s':>8}  collectives"]
    for step, r in xla_plan.steps(result):
        counts = ", ".join(f"{c['count']} {kind}" for kind, c in r["collectives"].items())
        lines.append(f"{step:<18}{r['planned_peak_gib']:>9.2f}{result['chip']['hbm_gib']:>7g}G"
                     f"{r['tflops']:>8.2f}{r['accessed_gb']:>8.1f}{r['bound_ms']:>10.1f}"
                     f"{r['bound_img_s']:>8.0f}  {counts or 'none'}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="64x64, 2 per chip, v5e:2x2, training and int8 evaluation (the test)")
    p.add_argument("--topology", action="append",
                   help=f"a TPU topology, repeatable ({', '.join(TOPOLOGIES)})")
    p.add_argument("--image-size", type=int, help="square image side (the config's, 224)")
    p.add_argument("--batch-per-chip", type=int,
                   help=f"images per chip (the config's, {tpu_config.BATCH_PER_CHIP})")
    p.add_argument("--output-dir", default=str(bench.RESULTS_DIR),
                   help="where the JSON files go (benchmarks/results)")
    args = p.parse_args(argv)
    args.topology = args.topology or list(SMOKE["topologies"] if args.smoke else TOPOLOGIES)
    args.image_size = args.image_size or (SMOKE["image_size"] if args.smoke
                                          else tpu_config.get_config().image_size)
    args.batch_per_chip = args.batch_per_chip or (SMOKE["batch_per_chip"] if args.smoke
                                                  else tpu_config.BATCH_PER_CHIP)
    args.eval_modes = SMOKE["eval"] if args.smoke else tuple(bench.EVAL_MODES)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for topology in args.topology:
        chip(topology)  # refuse an unknown generation before compiling anything
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    fits = True
    for topology in args.topology:
        result = plan_topology(topology, args.image_size, args.batch_per_chip, args.eval_modes)
        print(table(result))
        path = Path(args.output_dir) / f"{date}_tpu-{bench.slug(topology)}-plan.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
        fits &= all(r["fits"] for _, r in xla_plan.steps(result))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
