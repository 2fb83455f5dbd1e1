"""Orbax checkpoints of models (converted, merged or exported) and of training runs.

A *model checkpoint* is a directory holding an Orbax `StandardCheckpointer` tree
`{"params", "batch_stats"}` plus `sttn_model.json` naming the arch, so every tool knows what it
holds. A *training workdir* holds Orbax `CheckpointManager`s (see `sttn_jax.train_loop`).
`sttn_jax.model_sources.load` reads either, and the original PyTorch .pth/.pth.tar files.
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


# ---------------------------------------------------------------------------------------------
# Training checkpoints (read side): the CheckpointManager directories of a training workdir
# (`WORKDIR/checkpoints`, `WORKDIR/best`), each step holding the items "state" (the TrainState)
# and "meta" (JSON). Read without the config or a Trainer: only params and batch_stats are
# restored, as host numpy arrays (the Adam moments are never read), on any number of devices.

TRAINING_ITEMS = ("state", "meta")


def training_checkpoint_steps(directory) -> list[int]:
    """The finalized steps in a training CheckpointManager directory, ascending ([] if none)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return []
    return sorted(int(s) for s in ocp.path.step.checkpoint_steps(directory))


def load_training_checkpoint(directory, step: int):
    """(variables, meta) of `step` in a training CheckpointManager directory: variables
    {"params", "batch_stats"} as numpy arrays exactly as saved (latent kernels unclamped), meta
    the JSON item ({} when absent)."""
    directory = Path(directory).absolute()
    steps = training_checkpoint_steps(directory)
    if step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint of step {step}; steps there: "
                              f"{steps or 'none'}")
    state_dir = directory / str(step) / TRAINING_ITEMS[0]
    if not state_dir.is_dir():
        raise CheckpointError(f"{directory / str(step)}: no '{TRAINING_ITEMS[0]}' item; not a "
                              "checkpoint written by train.py")
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(state_dir)
        tree = getattr(metadata, "tree", metadata)
        if not hasattr(tree, "keys") or "params" not in tree:
            raise CheckpointError(f"{state_dir}: holds no 'params'; not a train.py checkpoint")
        wanted = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint becomes one message
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{state_dir}: cannot be restored ({type(e).__name__}: {last})") from None
    finally:
        handler.close()
    variables = {"params": _plain_dict(restored["params"]),
                 "batch_stats": _plain_dict(restored.get("batch_stats", {}))}
    meta = {}
    meta_file = directory / str(step) / TRAINING_ITEMS[1] / "metadata"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError:
            meta = {}
    return variables, meta


def _plain_dict(tree):
    """Nested plain dicts of numpy arrays (Orbax may hand back other mappings)."""
    if hasattr(tree, "items"):
        return {str(k): _plain_dict(v) for k, v in tree.items()}
    return np.asarray(tree)
