"""What benchmarks/gpu_plan.py and benchmarks/tpu_plan.py share: the benchmark's steps lowered for
devices that are described to XLA but not attached (`jax.experimental.topologies`), from abstract
inputs, and XLA's own figures of the compiled program.

memory(): per device, arguments + outputs - donated (aliased) buffers + XLA's temporary buffers of
the one compiled step: what it holds at its peak, the state, batch and teacher included.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import run as bench  # benchmarks/run.py: the measured steps' models and inference modes
from sttn_jax import merging, models, quantize, training

GIB = 2 ** 30
# `%name = type opcode(operands)` in XLA's optimized HLO text
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(?:, |$)")
ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")


def abstract(tree, sharding):
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)


def type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO array or tuple type such as `(f32[64]{0}, bf16[8,56,56,64]{3,2,1,0})`."""
    bits = {"pred": 8}
    return sum(math.prod(int(d) for d in dims.split(",") if d)
               * (bits.get(dt) or int(re.sub(r"\D", "", dt))) // 8
               for dt, dims in ARRAY.findall(hlo_type))


def batch_specs(mesh, global_batch: int, image_size: int, mask: bool = False) -> dict:
    """The global batch (images, labels; eval's mask) split over the mesh's data axis."""
    data = NamedSharding(mesh, P(training.DATA_AXIS))
    batch = {"image": jax.ShapeDtypeStruct((global_batch, image_size, image_size, 3), jnp.float32,
                                           sharding=data),
             "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=data)}
    if mask:
        batch["mask"] = jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=data)
    return batch


def lower_train_step(config, mesh):
    """`training.make_train_step` of `config` (its student, its teacher in the config's BatchNorm
    mode, Adam) lowered for `mesh` at config.batch_size and config.image_size."""
    tx = training.create_optimizer(config, training.learning_rate_fn(config, 1000))
    state = training.abstract_train_state(config, mesh, tx)
    teacher = abstract(jax.eval_shape(lambda: models.init_variables(
        models.create(config.teacher_arch, config.num_classes), jax.random.PRNGKey(1))),
        training.replicated(mesh))
    step = training.make_train_step(config, mesh, tx, teacher)
    return step.jitted.lower(state, batch_specs(mesh, config.batch_size, config.image_size),
                             teacher)


def eval_model(mode: str, backend: str, stem_conv: str = "conv"):
    """(module, variables as numpy arrays) of benchmarks/run.py's inference `mode` (EVAL_MODES):
    resnet18_ter merged from a student's variables (ones), its kernels in int8 form for int8."""
    dtype, inference_dtype = bench.EVAL_MODES[mode]
    module = models.create(bench.EVAL_ARCH, bench.NUM_CLASSES, dtype, backend,
                           inference_dtype=inference_dtype, stem_conv=stem_conv)
    student = jax.eval_shape(lambda: models.init_variables(
        models.create(bench.STUDENT, bench.NUM_CLASSES), jax.random.PRNGKey(0)))
    student = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), student)
    variables = jax.device_get(merging.merge_variables(student))
    if inference_dtype == "int8":
        variables = jax.device_get(quantize.int8_variables(variables))
    return module, variables


def steps(result: dict):
    """("train NAME" or "eval NAME", its figures) of each step planned in `result`."""
    for kind in ("train", "eval"):
        for name, figures in result[kind].items():
            yield f"{kind} {name}", figures


def memory(compiled) -> dict:
    """XLA's buffer assignment of `compiled`, per device, in GiB."""
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return {"planned_peak_gib": peak / GIB, "arguments_gib": m.argument_size_in_bytes / GIB,
            "outputs_gib": m.output_size_in_bytes / GIB, "alias_gib": m.alias_size_in_bytes / GIB,
            "temp_gib": m.temp_size_in_bytes / GIB}
