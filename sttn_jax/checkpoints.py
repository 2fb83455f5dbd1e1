"""Orbax checkpoints of models (converted, merged or exported) and of training runs.

A *model checkpoint* is a directory holding an Orbax `StandardCheckpointer` tree
`{"params", "batch_stats"}` plus `sttn_model.json` naming the arch, so every tool knows what it
holds. A *training workdir* holds an Orbax `CheckpointManager` (see `sttn_jax.training`).
`load_model` reads either, and the original PyTorch .pth/.pth.tar files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_METADATA = "sttn_model.json"
MODEL_ITEM = "variables"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def save_model(path, variables, arch: str, extra: dict | None = None) -> Path:
    """Writes `variables` ({"params", "batch_stats"}) of `arch` as a model checkpoint at `path`
    (a new directory; an existing one is replaced). Returns the absolute path."""
    path = Path(path).absolute()
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    tree = jax.tree_util.tree_map(np.asarray, tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / MODEL_ITEM, tree, force=True)
        ckptr.wait_until_finished()
    meta = {"arch": arch, "format": "sttn-jax model", **(extra or {})}
    if jax.process_index() == 0:
        (path / MODEL_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def is_model_checkpoint(path) -> bool:
    return (Path(path) / MODEL_METADATA).is_file()


def read_model_metadata(path) -> dict:
    return json.loads((Path(path) / MODEL_METADATA).read_text())


def load_model_checkpoint(path, arch: str | None = None):
    """(variables, arch) from a model checkpoint directory written by `save_model`."""
    path = Path(path).absolute()
    if not is_model_checkpoint(path):
        raise CheckpointError(f"{path}: not an sttn-jax model checkpoint (no {MODEL_METADATA})")
    found = read_model_metadata(path)["arch"]
    if arch is not None and arch != found:
        raise CheckpointError(f"{path}: holds a {found} model, not {arch}; pass --arch {found} or "
                              f"the checkpoint of a {arch} model")
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(path / MODEL_ITEM)
    tree = jax.tree_util.tree_map(np.asarray, tree)
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}, found


def is_torch_file(path) -> bool:
    p = str(path)
    return os.path.isfile(p) and p.endswith((".pth", ".pt", ".pth.tar", ".tar", ".bin"))
