"""XLA's plan for an NVIDIA H100, made on a machine without a GPU: the training and inference steps
of benchmarks/run.py compiled for sm_90 (deviceless, from benchmarks/h100_target.txtpb), and the
device memory each compiled step needs by XLA's own buffer assignment.

    make gpu-plan                                    # installs what it needs, then the full size
    python benchmarks/gpu_plan.py --smoke            # batch 8, 32x32 (the test)

Needs JAX's CUDA PJRT plugin (jax-cuda13-pjrt: the GPU compiler; no CUDA driver or GPU is used),
JAX's CUDA plugin and jax-triton importable; `make gpu-plan` puts them beside the test
environment and runs this with JAX_PLATFORMS=cpu. Nothing runs on a GPU: the numbers are a plan,
not a measurement.

planned_peak_gib = arguments + outputs - donated (aliased) buffers + XLA's temporary buffers of
the one compiled step: what it holds at its peak, the state, batch and teacher included. A real
GPU adds what a plan does not see: the CUDA context, cuDNN's workspace for the algorithms chosen
by autotuning (here none runs, so XLA takes cuDNN's default algorithms), and the allocator's
rounding. Also counted from the compiled program: the Triton kernel's calls (backend "triton"),
the int8 convolutions that run in cuDNN on int8 operands (inference int8), the kernels launched
per step and the bytes they move (`moved_gb`: the operands and results of every kernel of the
program's entry computation, operands counted in full except for slices; outside the convolutions
the step is bound by memory bandwidth, so this tracks its fusions' time).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import run as bench  # benchmarks/run.py: the measured steps' configuration
import xla_plan
from ops import ternary
from sttn_jax import convolutions, training

TARGET = Path(__file__).resolve().parent / "h100_target.txtpb"
TRAIN_CASES = [(dtype, backend, remat) for dtype in ("fp32", "bf16")
               for backend in ("xla", "triton") for remat in ("on", "off")]
EVAL_CASES = [(mode, backend) for mode in bench.EVAL_MODES for backend in ("xla", "triton")]
# --smoke: the Triton kernel inside XLA's GPU pipeline (remat on, as on a GPU) and int8 inference
SMOKE_TRAIN_CASES, SMOKE_EVAL_CASES = [("fp32", "triton", "on")], [("int8", "xla")]
# Options that change what is computed (off by default), planned beside the defaults' cases
TEACHER_BN_EVAL_CASES = [(dtype, "xla", "off") for dtype in ("fp32", "bf16")]
# What a convolution of int8 operands may write: the model's int32 sums as float32, or a
# 2-byte float directly (preferred_element_type)
INT8_CONV_OUTPUTS = {"float32": (jnp.int32, jnp.float32), "bfloat16": (jnp.bfloat16, None),
                     "float16": (jnp.float16, None)}
KERNEL_CALL = re.compile(r'custom_call_target="triton_kernel_call')
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def h100():
    """A compile-only H100 (`jax.experimental.topologies`, JAX's CUDA PJRT plugin)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc("h100", "cuda", target_config=TARGET.read_text(),
                                        topology="1x1x1").devices[0]


def entry_instructions(text: str):
    """(name, type, opcode, operands) of each instruction of optimized HLO `text`'s entry
    computation."""
    entry = text[text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    for line in entry.splitlines()[1:]:
        if m := xla_plan.INSTRUCTION.match(line):
            yield m.groups()


def kernels_and_bytes(text: str) -> tuple[int, int]:
    """(kernels, bytes moved) of the entry computation of optimized HLO `text`."""
    sizes, kernels, moved = {}, 0, 0
    for name, hlo_type, opcode, operands in entry_instructions(text):
        sizes[name] = xla_plan.type_bytes(hlo_type)
        if opcode in NOT_KERNELS:
            continue
        read = sum(sizes.get(o, 0) for o in re.findall(r"%([\w.-]+)", operands))
        kernels += 1
        moved += sizes[name] + (sizes[name] if "slice" in name else read)
    return kernels, moved


def summary(compiled) -> dict:
    text = compiled.as_text()
    kernels, moved = kernels_and_bytes(text)
    # copies: kernels that move data and compute nothing (state updated through a temporary)
    copies = sum(1 for *_, opcode, _ in entry_instructions(text) if opcode == "copy")
    return {**xla_plan.memory(compiled), "kernels": kernels, "moved_gb": moved / 1e9,
            "copies": copies,
            "kernel_calls": len(KERNEL_CALL.findall(text)),
            "cudnn_convs": text.count('custom_call_target="__cudnn$conv'),
            "cudnn_int8_convs": sum(1 for line in text.splitlines()
                                    if "__cudnn$conv" in line and _int8_operands(line, text))}


def _int8_operands(line: str, text: str) -> bool:
    """Whether the cuDNN convolution on `line` reads two int8 (s8) operands."""
    names = re.search(r"custom-call\((%[\w.-]+), (%[\w.-]+)\)", line)
    if not names:
        return False
    return all(re.search(rf"{re.escape(n)} = s8\[", text) for n in names.groups())


def plan_train(device, dtype: str, backend: str, remat: str, batch: int, image_size: int,
               stem_conv: str = "conv", teacher_bn_train_mode: bool = True) -> dict:
    """The training step of benchmarks/run.py (student, teacher, Adam) for `device`."""
    config = bench.train_config(dtype, backend, batch, image_size, remat, stem_conv,
                                teacher_bn_train_mode)
    return summary(xla_plan.lower_train_step(config, training.make_mesh([device])).compile())


def plan_eval(device, mode: str, backend: str, batch: int, image_size: int,
              stem_conv: str = "conv") -> dict:
    """resnet18_ter inference (a mode of EVAL_MODES) as benchmarks/run.py times it, for `device`."""
    module, variables = xla_plan.eval_model(mode, backend, stem_conv)
    placed = jax.sharding.SingleDeviceSharding(device)
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32, sharding=placed)
    fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
    return summary(fn.lower(xla_plan.abstract(variables, placed), images).compile())


def int8_conv_outputs(device) -> dict:
    """What XLA's GPU compiler makes of a 3x3 convolution of int8 operands asked for each output
    type of INT8_CONV_OUTPUTS: {type: {"int8_operands": whether cuDNN reads int8, "writes": the
    type the convolution writes}}. Why int8 inference writes 4 bytes per output value."""
    placed = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((8, 16, 16, 64), jnp.int8, sharding=placed)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.int8, sharding=placed)
    out = {}
    for name, (sums, then) in INT8_CONV_OUTPUTS.items():
        def conv(x, w, sums=sums, then=then):
            y = convolutions.conv2d(x, w, 1, 1, preferred_element_type=sums)
            return y if then is None else y.astype(then)
        text = jax.jit(conv).lower(x, w).compile().as_text()
        line = next(line for line in text.splitlines() if "__cudnn$conv" in line)
        out[name] = {"int8_operands": _int8_operands(line, text),
                     "writes": re.search(r"= \((\w+)\[", line).group(1)}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="batch 8, 32x32; training fp32/triton/remat=on, inference int8 (the test)")
    p.add_argument("--batch", type=int, help="global batch (256)")
    p.add_argument("--image-size", type=int, help="square image side (224)")
    p.add_argument("--stem-conv", choices=tuple(convolutions.CONV_FORMS), default="conv",
                   help="config.stem_conv of every step planned (conv)")
    p.add_argument("--output", help="JSON path (default: print only)")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.smoke else 256)
    args.image_size = args.image_size or (32 if args.smoke else 224)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = h100()
    ternary.assume_cuda_gpu(90)  # backend "triton" for an sm_90 device not attached
    result = {"device": device.device_kind, "target": TARGET.name, "batch": args.batch,
              "image_size": args.image_size, "stem_conv": args.stem_conv,
              "jax_version": jax.__version__, "train": {}, "eval": {}}
    for dtype, backend, remat in SMOKE_TRAIN_CASES if args.smoke else TRAIN_CASES:
        name = f"{dtype}/{backend}/remat={remat}"
        print(f"... train {name}", file=sys.stderr, flush=True)
        result["train"][name] = plan_train(device, dtype, backend, remat, args.batch,
                                           args.image_size, args.stem_conv)
    for dtype, backend, remat in [] if args.smoke else TEACHER_BN_EVAL_CASES:
        name = f"{dtype}/{backend}/remat={remat}/teacher_bn=eval"
        print(f"... train {name}", file=sys.stderr, flush=True)
        result["train"][name] = plan_train(device, dtype, backend, remat, args.batch,
                                           args.image_size, args.stem_conv, False)
    for mode, backend in SMOKE_EVAL_CASES if args.smoke else EVAL_CASES:
        name = f"{mode}/{backend}"
        print(f"... eval {name}", file=sys.stderr, flush=True)
        result["eval"][name] = plan_eval(device, mode, backend, args.batch, args.image_size,
                                         args.stem_conv)
    result["int8_conv_outputs"] = int8_conv_outputs(device)
    lines = [f"XLA's plan for one {device.device_kind}, batch {args.batch}, "
             f"{args.image_size}x{args.image_size}, stem_conv {args.stem_conv} (compiled without "
             "a GPU; not a measurement)",
             f"{'step':<42}{'planned peak GiB':>17}{'temp GiB':>10}{'kernels':>9}{'copies':>8}"
             f"{'moved GB':>10}{'Triton calls':>14}{'int8 convs':>12}"]
    for step, r in xla_plan.steps(result):
        lines.append(f"{step:<42}{r['planned_peak_gib']:>17.2f}{r['temp_gib']:>10.2f}"
                     f"{r['kernels']:>9}{r['copies']:>8}{r['moved_gb']:>10.2f}"
                     f"{r['kernel_calls']:>14}{r['cudnn_int8_convs']:>12}")
    lines.append("a convolution of int8 operands asked for " + ", ".join(
        f"{t}: {'int8' if r['int8_operands'] else 'operands converted to ' + r['writes']} "
        f"convolution writing {r['writes']}" for t, r in result["int8_conv_outputs"].items()))
    print("\n".join(lines))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
