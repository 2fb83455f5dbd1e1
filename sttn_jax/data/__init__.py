"""TFDS input pipelines: ImageNet (the original's transforms), any TFDS image dataset, the
embedded `sttn_digits` demo set, and a tiny fabricated ImageNet for smoke runs.

Importing this package does not import TensorFlow; the names below import it on first use
(`sttn_jax.data.pipeline` hides every GPU from TensorFlow when it is imported).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "make_dataset": "pipeline",
    "num_examples": "pipeline",
    "steps_per_epoch": "pipeline",
    "check_num_shards": "pipeline",
    "get_builder": "pipeline",
    "DatasetNotPreparedError": "pipeline",
    "preprocess_for_train": "pipeline",
    "preprocess_for_eval": "pipeline",
    "IMAGENET_MEAN": "pipeline",
    "IMAGENET_STD": "pipeline",
    "fabricate_imagenet": "fabricate",
    "prepare_imagenet": "fabricate",
    "ensure_fake_imagenet": "fabricate",
    "ensure_digits": "digits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
