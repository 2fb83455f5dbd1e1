"""Evaluation of a model from any source on a TFDS split: top-1, top-5, mean cross-entropy.

`evaluate_checkpoint` is what eval.py runs, with train.py's eval step; bwx2 latent kernels are
clamped first, as the original's validate() does, so a bwx2 model and its merge agree.
"""

import jax
import numpy as np
from absl import logging

import ops
from sttn_jax import archs, model_io, models, quantize, training
from sttn_jax.data import pipeline, sources, tf_import
from sttn_jax.errors import CheckpointError, ConfigError

tf_import.tf()  # clu's metric writers import TensorFlow: through tf_import, quietly, after Triton
from sttn_jax.metric_writers import Progress  # noqa: E402


def eval_config(config, loaded, split: str | None):
    """A copy of `config` set up for the model in `loaded` and `split`, checked."""
    cfg = config.copy_and_resolve_references()
    cfg.arch = loaded.arch
    if split:
        cfg.eval_split = split
    if int(cfg.num_classes) != loaded.num_classes:
        raise ConfigError(
            f"the model in {loaded.path} has {loaded.num_classes} classes but config.num_classes="
            f"{cfg.num_classes}; pass --config.num_classes={loaded.num_classes} (and a dataset "
            "whose labels fit)")
    if not cfg.eval_split:
        raise ConfigError("no split to evaluate: give a split or set config.eval_split")
    if problem := archs.inference_dtype_problem(loaded.arch, cfg.inference_dtype):
        raise ConfigError(f"config.inference_dtype={cfg.inference_dtype!r} for {loaded.path}: "
                          f"{problem}")
    training.check_model_config(cfg)
    return cfg


def evaluate_checkpoint(config, source, *, arch: str | None = None, split: str | None = None,
                        step: int | None = None, progress: bool | None = None, loaded=None) -> dict:
    """Top-1, top-5, loss and what was evaluated, of the model at `source` over `split`; `loaded`
    (a `model_io.LoadedModel`) skips reading `source` again."""
    loaded = loaded or model_io.load(source, arch=arch, step=step)
    cfg = eval_config(config, loaded, split)
    mesh = training.make_mesh()
    training.check_batch(cfg, "eval_batch_size", mesh.devices.size)
    sources.prepare(cfg)
    sources.check(cfg, split_keys=("eval_split",))
    num_batches = sources.eval_steps(cfg, cfg.eval_split)
    variables = {"params": ops.clamp_latent_kernels(loaded.variables["params"]),
                 "batch_stats": loaded.variables.get("batch_stats", {})}
    module = None
    if cfg.inference_dtype == "int8":
        try:
            variables = quantize.int8_variables(jax.tree_util.tree_map(np.asarray, variables))
        except ValueError as e:
            raise CheckpointError(f"{loaded.path}: {e}") from None
        module = models.create(cfg.arch, cfg.num_classes, training.DTYPES[cfg.dtype],
                               cfg.act_backend, inference_dtype="int8", stem_conv=cfg.stem_conv)
    variables = jax.device_put(jax.tree_util.tree_map(np.asarray, variables),
                               training.replicated(mesh))
    logging.info("evaluating %s on %s/%s, %s: %d batches of %d over %d device%s",
                 loaded.describe(), cfg.dataset, cfg.eval_split,
                 "int8 inference (block convolutions in integers)"
                 if cfg.inference_dtype == "int8" else cfg.dtype,
                 num_batches, cfg.eval_batch_size, mesh.devices.size,
                 "" if mesh.devices.size == 1 else "s")
    bar = Progress(cfg.progress_bar if progress is None else progress, num_batches, 0,
                   unit="batch", desc=f"eval {cfg.eval_split}")
    try:
        metrics = training.evaluate(training.make_eval_step(cfg, mesh, module), mesh, variables,
                                    pipeline.numpy_batches(pipeline.make_eval_dataset(cfg)),
                                    bar.advance)
    finally:
        bar.close()
    return {**metrics, "arch": loaded.arch, "checkpoint": loaded.path, "split": cfg.eval_split,
            "dataset": cfg.dataset, "image_size": int(cfg.image_size),
            "inference_dtype": cfg.inference_dtype, "source": loaded.info()}


def format_result(result: dict) -> str:
    int8 = ", int8 inference" if result.get("inference_dtype") == "int8" else ""
    return (f"{result['arch']}{int8} on {result['dataset']}/{result['split']} "
            f"({result['num_examples']} examples, {result['image_size']}x{result['image_size']}): "
            f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
            f"loss {result['loss']:.4f}")
