"""Where the device time of the benchmarked steps goes: a per-kernel breakdown from JAX's profiler.

    python benchmarks/profile_steps.py                       # train fp32/bf16, eval fp32/bf16
    python benchmarks/profile_steps.py --only train_bf16 --remat on
    python benchmarks/profile_steps.py --smoke               # tiny sizes (CPU tests)

Each program is the one `benchmarks/run.py` times (same sizes, models and options). After warm-up
it traces --trace-steps calls with `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData` and sums the kernels' device time per step: by category (convolution,
matrix product, the Triton activation, other fusions, copies), by part of the step (the teacher,
the student's forward and backward, the rest, told apart by the op names JAX records in the
compiled HLO; a kernel inside a command buffer, a CUDA graph whose kernels the profiler all names
after the buffer, is matched to the fusion it is named after), and the top kernels. The wall
time per step is timed as run.py times it (steps back to back), and the traced steps run back to
back too: the device's idle time between kernels (`idle`: the traced span less the time some
kernel ran, per step) is then the gap between device time and wall time, and its gaps by size
and the largest ones, with the kernels around them, say whether it is many launch gaps or a few
waits. Writes JSON (--output) and prints a table.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: the measured programs)

import jax  # noqa: E402

PROGRAMS = ("train_fp32", "train_bf16") + tuple(f"eval_{mode}" for mode in bench.EVAL_MODES)
DEFAULT_PROGRAMS = PROGRAMS[:4]
# ops.kernels' kernels as the profiler names them (with and without the backward pass's mask)
TRITON_KERNELS = ("ternary_forward_kernel", "ternary_values_kernel")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(DEFAULT_PROGRAMS),
                   help=f"comma-separated subset of {','.join(PROGRAMS)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, as run.py --smoke")
    p.add_argument("--remat", choices=("on", "off", "auto"), help="as run.py --remat")
    p.add_argument("--backend", default="auto", choices=bench.ternary_mod.BACKENDS)
    p.add_argument("--trace-steps", type=int, default=5, help="calls traced per program (5)")
    p.add_argument("--top", type=int, default=15, help="kernels listed per program (15)")
    p.add_argument("--output", default="profile.json")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not only or set(only) - set(PROGRAMS):
        p.error(f"--only takes a comma-separated subset of {','.join(PROGRAMS)}, got {args.only!r}")
    args.only = only
    run_argv = ["--backend", args.backend] + (["--smoke"] if args.smoke else []) \
        + (["--remat", args.remat] if args.remat else [])
    args.bench = bench.parse_args(run_argv)
    return args


def op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: op_name metadata} of a compiled module's HLO text. A fusion without
    metadata of its own takes the first op_name inside the computation it calls."""
    own, calls, first_in = {}, {}, {}
    computation = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and " = " not in line:
            computation = head.group(1)
            continue
        inst = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not inst:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        if name:
            own.setdefault(inst.group(1), name.group(1))
            first_in.setdefault(computation, name.group(1))
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[inst.group(1)] = called.group(1)
    for inst, computation in calls.items():
        if inst not in own and computation in first_in:
            own[inst] = first_in[computation]
    return own


def part_of_step(op_name: str) -> str:
    """Which part of the step an op belongs to, from its name: the teacher (module ResNet50), the
    student's backward pass (transposed), its forward pass (differentiated), or the rest (the
    optimizer and the metrics in a training step; the whole network in inference)."""
    if "/ResNet50/" in op_name:
        return "teacher"
    if "transpose(" in op_name:
        return "student backward"
    if "jvp(" in op_name:
        return "student forward"
    return "other" if op_name else "unattributed"


def category(kernel: str, hlo_op: str) -> str:
    k, h = kernel.lower(), hlo_op.lower()
    if any(name in k for name in TRITON_KERNELS):
        return "triton activation"
    if "conv" in h or "cudnn" in k or "conv" in k or "xmma" in k or "implicit" in k:
        return "convolution"
    if "gemm" in k or "cublas" in k or "dot" in h or "gemm" in h:
        return "matrix product"
    if "memcpy" in k or "memset" in k or h.startswith(("copy", "transpose")):
        return "copy / transpose / memset"
    return "other fusions"


def kernel_events(xplane_path: str):
    """(kernel name, hlo_op, start ns, duration ns) of every device kernel in the trace; on a CPU
    (smoke), the XLA thunks the host ran instead."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    devices = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in devices or [p for p in data.planes if p.name.startswith("/host:CPU")]:
        for line in plane.lines:
            if devices and not line.name.lower().startswith("stream"):
                continue  # derived lines (XLA Modules, XLA Ops, ...) repeat the kernels' time
            for event in line.events:
                stats = dict(event.stats)
                if not devices and "hlo_op" not in stats:
                    continue
                yield (event.name, str(stats.get("hlo_op", "")), float(event.start_ns),
                       float(event.duration_ns))


def instruction_of(kernel: str, hlo_op: str, names: dict) -> str:
    """The HLO instruction a kernel ran for. The profiler gives every kernel of a command buffer
    (a CUDA graph) the buffer's name as hlo_op; XLA names a fusion's kernel after the fusion,
    dots made underscores (fusion `loop_add_fusion.3`, kernel `loop_add_fusion_3`)."""
    if not hlo_op.startswith("command_buffer"):
        return hlo_op
    for candidate in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
        if candidate in names:
            return candidate
    return hlo_op


# Idle gaps between kernels, by size: a launch gap is a few microseconds, a wait for the host more
GAP_BUCKETS_US = (5, 20, 100)


def idle_gaps(events, steps: int, listed: int = 5) -> dict:
    """Where the device was idle: `events` are (label, start ns, duration ns) of kernels on any
    stream; a gap is a stretch between the first start and the last end where none ran. Per step:
    the span, the busy and idle ms, the gaps' count and ms by size (GAP_BUCKETS_US), and the
    `listed` largest gaps with the kernels before and after them."""
    events = sorted(events, key=lambda e: e[1])
    busy_until, before, gaps, busy = None, None, [], 0.0
    for label, start, duration in events:
        end = start + duration
        if busy_until is None or start > busy_until:
            if busy_until is not None:
                gaps.append((start - busy_until, before, label))
            busy += duration
            busy_until, before = end, label
        elif end > busy_until:
            busy += end - busy_until
            busy_until, before = end, label
    span = busy_until - events[0][1] if events else 0.0
    buckets = {}
    for i, limit in enumerate((*GAP_BUCKETS_US, None)):
        low = GAP_BUCKETS_US[i - 1] if i else 0
        name = f"{low}-{limit} us" if limit else f">{low} us"
        inside = [g for g, _, _ in gaps if low * 1e3 <= g < (limit or float("inf")) * 1e3]
        buckets[name] = {"count_per_step": len(inside) / steps,
                         "ms_per_step": sum(inside) / 1e6 / steps}
    return {"span_ms_per_step": span / 1e6 / steps, "busy_ms_per_step": busy / 1e6 / steps,
            "idle_ms_per_step": (span - busy) / 1e6 / steps, "gaps": buckets,
            "largest_gaps": [{"us": g / 1e3, "after": a, "before": b}
                             for g, a, b in sorted(gaps, reverse=True)[:listed]]}


def profile(call, compiled, steps: int, top: int) -> dict:
    """The kernel-time breakdown of `steps` calls of a warmed-up `call`."""
    names = op_names(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):  # back to back, as a training loop runs them
                out = call()  # (a step donates the state the previous one returned)
            jax.block_until_ready(out)
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        events = [(kernel, instruction_of(kernel, hlo_op, names), start, ns)
                  for kernel, hlo_op, start, ns in kernel_events(path)]
    by_cat, by_part, by_op = (collections.Counter() for _ in range(3))
    kernel_of, launches = {}, collections.Counter()  # an op's longest kernel (not its memsets)
    for kernel, hlo_op, _, ns in events:
        ms = ns / 1e6 / steps
        op = names.get(hlo_op, "")
        by_cat[category(kernel, hlo_op)] += ms
        by_part[part_of_step(op)] += ms
        key = hlo_op or kernel
        by_op[key] += ms
        launches[key] += 1
        if ns > kernel_of.get(key, (0,))[0]:
            kernel_of[key] = (ns, kernel[:90], op[-140:])
    return {
        "device_ms_per_step": sum(by_cat.values()),
        "kernels_per_step": len(events) / steps,
        "by_category_ms": dict(by_cat.most_common()),
        "by_part_ms": dict(by_part.most_common()),
        "top": [{"hlo_op": k, "ms": ms, "launches_per_step": launches[k] / steps,
                 "kernel": kernel_of[k][1], "op_name": kernel_of[k][2]}
                for k, ms in by_op.most_common(top)],
        "idle": idle_gaps([(kernel[:60] if kernel == hlo_op else f"{kernel[:60]} ({hlo_op})",
                            start, ns) for kernel, hlo_op, start, ns in events], steps),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    b = bench.Bench(args.bench)
    a = args.bench
    result = {"device": jax.devices()[0].device_kind, "batch": a.batch, "image_size": a.image_size,
              "remat": a.remat, "backend": args.backend, "jax_version": jax.__version__,
              "programs": {}}
    for name in args.only:
        kind, mode = name.split("_", 1)  # mode: a dtype, or one of run.py's EVAL_MODES
        if kind == "train":
            call, compiled, compile_s, _ = b.train_program(mode, args.backend)
        else:
            call, compiled, compile_s = b.inference_program(mode, args.backend)
        # as run.py times it (back-to-back steps); this also warms the program up for the trace
        wall = bench.median_seconds(call, max(a.steps // 2, 1), a.warmup, a.steps_per_sample)
        r = profile(call, compiled, args.trace_steps, args.top)
        r.update(wall_ms_per_step=wall * 1e3, compile_s=compile_s, img_s=a.batch / wall)
        result["programs"][name] = r
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"== {name}: {r['wall_ms_per_step']:.2f} ms wall, {r['device_ms_per_step']:.2f} ms "
              f"in {r['kernels_per_step']:.0f} kernels per step ({r['img_s']:,.0f} img/s)")
        print("   " + ", ".join(f"{k} {v:.2f}" for k, v in r["by_category_ms"].items()))
        print("   " + ", ".join(f"{k} {v:.2f}" for k, v in r["by_part_ms"].items()))
        for t in r["top"]:
            print(f"   {t['ms']:7.3f} ms x{t['launches_per_step']:<4g} {t['hlo_op'][:28]:<28} "
                  f"{t['kernel'][:40]:<40} {t['op_name'][-70:]}", flush=True)
        idle = r["idle"]
        print(f"   idle {idle['idle_ms_per_step']:.3f} of {idle['span_ms_per_step']:.3f} ms per "
              "step; gaps " + ", ".join(f"{k}: {v['count_per_step']:g} ({v['ms_per_step']:.3f} ms)"
                                        for k, v in idle["gaps"].items()))
        for g in idle["largest_gaps"]:
            print(f"   gap {g['us']:9.1f} us after {g['after'][:60]} before {g['before'][:60]}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
