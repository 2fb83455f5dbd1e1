"""Evaluation of a model from any source on a TFDS split: top-1, top-5, mean cross-entropy.

`evaluate_checkpoint(config, checkpoint, arch=None, split=None, step=None)` is what `eval.py`
runs. The model comes from a training workdir, a model checkpoint or an original PyTorch file
(`sttn_jax.model_sources`; its arch is what the source holds, `arch` only checks it); the data,
image size, batch size and dtype come from the config, exactly as train.py evaluates
(`sttn_jax.training.Trainer.evaluate`: the eval step under `jax.shard_map` on a 1-D mesh over every
device of every process, centre crops, padded last batch masked out, sums reduced over the mesh).

bwx2 latent kernels are clamped to [-1, 1] before evaluation, as the original's validate() does
(its `BinOp.binarization()` clamps in place), so a bwx2 model and its merged ternary model give the
same logits, hence the same top-1/top-5, exactly.
"""
from __future__ import annotations

import logging
log = logging.getLogger("sttn_jax")

RESULT_KEYS = ("top1", "top5", "loss", "num_examples", "arch", "checkpoint")


def _config_error(message: str):
    from sttn_jax.preflight import ConfigError

    return ConfigError(message)


def eval_config(config, loaded):
    """A copy of `config` set up for the model in `loaded` (its arch); refuses a config whose
    class count differs from the model's."""
    cfg = config.copy_and_resolve_references()
    cfg.arch = loaded.arch
    if int(cfg.num_classes) != loaded.num_classes:
        raise _config_error(
            f"the model in {loaded.path} has {loaded.num_classes} classes but config.num_classes="
            f"{cfg.num_classes}; pass --config.num_classes={loaded.num_classes} (and a dataset whose "
            "labels fit)")
    return cfg


def validate_eval_config(cfg, num_devices: int, split: str) -> None:
    from sttn_jax import training
    from sttn_jax.preflight import validate_model_config

    validate_model_config(cfg)
    if cfg.eval_batch_size <= 0:
        raise _config_error(f"config.eval_batch_size={cfg.eval_batch_size} must be positive")
    try:
        training.check_batch_divisible(cfg.eval_batch_size, num_devices, "eval_batch_size")
    except ValueError as e:
        raise _config_error(str(e)) from None
    if not split:
        raise _config_error("no split to evaluate: pass --split or set --config.eval_split")


def evaluate_checkpoint(config, checkpoint, *, arch: str | None = None, split: str | None = None,
                        step: int | None = None, progress: bool | None = None, mesh=None,
                        loaded=None) -> dict:
    """Top-1 / top-5 (fractions) and mean cross-entropy of the model at `checkpoint` over
    `split` (default config.eval_split) of config.dataset.

    Returns {"top1", "top5", "loss", "num_examples", "arch", "checkpoint", "split", "dataset",
    "image_size", "source"}. progress: a tqdm bar (process 0); None = config.progress_bar.
    `loaded` (a `model_sources.LoadedModel`) skips reading `checkpoint` again."""
    import jax
    import numpy as np

    import ops
    from sttn_jax import data, model_sources, preflight, training

    if loaded is None:
        loaded = model_sources.load(checkpoint, arch=arch, step=step)
    elif arch is not None and arch != loaded.arch:
        raise model_sources.mismatch_error(loaded.path, loaded.arch, arch)
    cfg = eval_config(config, loaded)
    mesh = mesh or training.make_mesh()
    split = split or cfg.eval_split
    validate_eval_config(cfg, mesh.devices.size, split)
    preflight.prepare_data(cfg)
    cfg.eval_split = split
    preflight.check_data(cfg, split_keys=("eval_split",))  # one line for an unknown name or split
    data_dir = preflight.data_dir(cfg)
    try:
        num_batches = data.steps_per_epoch(cfg.dataset, split, cfg.eval_batch_size, data_dir,
                                           train=False)
    except data.DatasetNotPreparedError:
        raise
    except ValueError as e:
        raise _config_error(" ".join(str(e).split())) from None

    trainer = training.Trainer(cfg, steps_per_epoch=max(num_batches, 1), mesh=mesh)
    variables = {"params": ops.clamp_latent_kernels(loaded.variables["params"]),
                 "batch_stats": loaded.variables.get("batch_stats", {})}
    variables = jax.device_put(jax.tree_util.tree_map(np.asarray, variables), trainer.replicated)
    per_process = cfg.eval_batch_size // jax.process_count()
    ds = data.make_dataset(cfg.dataset, split, batch_size=per_process, train=False,
                           image_size=cfg.image_size, resize_size=cfg.resize_size,
                           data_dir=data_dir)
    log.info("evaluating %s on %s/%s: %d batches of %d over %d devices", loaded.describe(),
             cfg.dataset, split, num_batches, cfg.eval_batch_size, mesh.devices.size)
    show = cfg.progress_bar if progress is None else progress
    bar = _bar(show and jax.process_index() == 0, num_batches, f"eval {split}")
    try:
        metrics = trainer.evaluate(variables, ds.as_numpy_iterator(),
                                   progress=(lambda _batch: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
            "num_examples": metrics["num_examples"], "arch": loaded.arch,
            "checkpoint": loaded.path, "split": split, "dataset": cfg.dataset,
            "image_size": int(cfg.image_size), "source": loaded.info()}


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="batch", desc=desc, dynamic_ncols=True)


def format_result(result: dict) -> str:
    return (f"{result['arch']} on {result['dataset']}/{result['split']} "
            f"({result['num_examples']} examples, {result['image_size']}x{result['image_size']}): "
            f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
            f"loss {result['loss']:.4f}")


def write_result(result: dict, path) -> None:
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")

