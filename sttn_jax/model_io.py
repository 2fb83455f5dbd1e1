"""One way to read a model, whatever holds it, and one way to save one.

`load` reads a training workdir (its best evaluated checkpoint, else the newest, or `step`; also
`WORKDIR/checkpoints[/N]`), a model checkpoint directory written by `save`, a packed model file or
an original PyTorch .pth/.pth.tar. The arch comes from the source (`arch` only checks it); the
variables come back as stored and checked; every problem is a CheckpointError naming the fix.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from sttn_jax import archs, checkpoints, json_io, model_trees, packed
from sttn_jax.errors import ArchMismatchError, CheckpointError
from sttn_jax.interop import torch_io

MODEL_METADATA = "sttn_model.json"
MODEL_ITEM = "variables"
WORKDIR, MODEL_CHECKPOINT, PYTORCH = "training workdir", "model checkpoint", "pytorch checkpoint"
PACKED = "packed model file"


@dataclasses.dataclass
class LoadedModel:
    """A model read from a source: its variables, its arch, and where exactly it came from."""
    variables: dict
    arch: str
    kind: str                       # WORKDIR, MODEL_CHECKPOINT, PACKED or PYTORCH
    path: str                       # what was given (absolute)
    step: int | None = None         # training step (workdirs)
    selected: str | None = None     # "best", "latest", "step" (workdirs)
    config: dict | None = None      # the workdir's config.json, when present
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return model_trees.num_classes_of(self.variables["params"])

    @property
    def run_config(self) -> dict | None:
        """The training run's config, where the source records it, else None."""
        recorded = self.config if self.kind == WORKDIR else self.meta.get("config")
        return recorded if isinstance(recorded, dict) else None

    @property
    def image_size(self) -> int | None:
        """The training image size the source records (None where it records no config)."""
        size = (self.run_config or {}).get("image_size")
        return int(size) if isinstance(size, int) else None

    def describe(self) -> str:
        if self.kind == WORKDIR:
            return f"{self.arch} from {self.path} ({self.selected} checkpoint, step {self.step})"
        return f"{self.arch} from {self.kind} {self.path}"

    def info(self) -> dict:
        """A JSON-able record of the source (for reports and the metadata of derived models)."""
        out = {"kind": self.kind, "path": self.path, "arch": self.arch,
               "num_classes": self.num_classes}
        if self.kind == WORKDIR:
            out.update(step=self.step, selected=self.selected)
        keys = {WORKDIR: ("best_top1", "eval"), PYTORCH: ("epoch", "best_prec1")}.get(self.kind, ())
        out.update({k: self.meta[k] for k in keys if self.meta.get(k) is not None})
        return out


def save(path, variables, arch: str, extra: dict | None = None) -> Path:
    """Writes `variables` of `arch` as a model checkpoint directory at `path` (replacing one)."""
    archs.check_arch(arch)
    path = Path(path).absolute()
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / MODEL_ITEM, jax.tree_util.tree_map(np.asarray, tree), force=True)
    if jax.process_index() == 0:
        meta = {"arch": arch, "format": "sttn-jax model", **(extra or {})}
        json_io.write_json(meta, path / MODEL_METADATA)
    return path


def is_model_checkpoint(path) -> bool:
    return (Path(path) / MODEL_METADATA).is_file()


def _check(path, found: str | None, wanted: str | None) -> None:
    if wanted is not None and found is not None and found != wanted:
        raise ArchMismatchError(path, found, wanted)


def _load_model_dir(path: Path, arch) -> LoadedModel:
    try:
        meta = json.loads((path / MODEL_METADATA).read_text())
        found = meta["arch"]
        if found not in archs.ARCHS:
            raise KeyError(found)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path / MODEL_METADATA}: damaged (not the JSON sttn-jax writes, "
                              f"naming one of {', '.join(archs.ARCHS)}); rewrite the model "
                              "checkpoint (convert or merge it again)") from None
    _check(path, found, arch)
    checkpoints.quiet_orphaned_reads()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(path / MODEL_ITEM)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint becomes one message
        raise CheckpointError(f"{path}: its {MODEL_ITEM} cannot be restored ({type(e).__name__});"
                              " rewrite the model checkpoint") from None
    tree = tree if hasattr(tree, "get") else {}  # not a dict: check_variables says what is missing
    variables = {"params": tree.get("params", {}), "batch_stats": tree.get("batch_stats", {})}
    variables = jax.tree_util.tree_map(np.asarray, variables)
    return LoadedModel(variables, found, MODEL_CHECKPOINT, str(path), meta=meta)


def _workdir_parts(path: Path):
    """(workdir, newest, step or None) when `path` is a workdir, its checkpoints/ or a step."""
    def is_workdir(p):
        return p.is_dir() and (p / checkpoints.LATEST).is_dir()

    if is_workdir(path) and not is_model_checkpoint(path):
        return path, False, None
    if path.name == checkpoints.LATEST and is_workdir(path.parent):
        return path.parent, True, None
    if path.name.isdigit() and path.parent.name == checkpoints.LATEST:
        return path.parent.parent, True, int(path.name)
    return None


def _select(workdir: Path, newest: bool, step):
    """(step, how): `step`, else the best evaluated step (unless `newest`), else the newest."""
    kept = checkpoints.steps(workdir / checkpoints.LATEST)
    listing = f"{checkpoints.LATEST}/: {kept or 'none'}"
    if step is not None:
        if step in kept:
            return step, "step"
        raise CheckpointError(f"{workdir}: no checkpoint of step {step} ({listing}); pick one of "
                              "those steps")
    if not kept:
        raise CheckpointError(f"{workdir}: a training workdir without checkpoints ({listing}); "
                              "train first, or give a model checkpoint or a .pth file")
    best = None if newest else checkpoints.best_step(
        checkpoints.manager(workdir / checkpoints.LATEST, 1, read_only=True))
    return (best, "best") if best is not None else (kept[-1], "latest")


def _load_workdir(path: Path, parts, arch, step) -> LoadedModel:
    workdir, newest, dir_step = parts
    if dir_step is not None:
        if step is not None and step != dir_step:
            raise CheckpointError(f"{path}: is the checkpoint of step {dir_step}, but step {step} "
                                  "was asked for")
        step = dir_step
    step, how = _select(workdir, newest, step)
    variables, meta = checkpoints.read_variables(workdir / checkpoints.LATEST, step)
    found = model_trees.arch_of(variables["params"])
    if found is None:
        raise CheckpointError(f"{workdir / checkpoints.LATEST / str(step)}: its parameters are "
                              f"not those of any of {', '.join(archs.ARCHS)}")
    _check(path, found, arch)
    try:
        config = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):  # none, or damaged: the model is still usable
        config = None
    return LoadedModel(variables, found, WORKDIR, str(path), step=step, selected=how,
                       config=config, meta=meta)


def load(source, arch: str | None = None, step: int | None = None) -> LoadedModel:
    """The model at `source`; `arch` None accepts what it holds; `step`: workdirs only. The
    variables are checked here, once (tree, shapes, finite values), for every tool."""
    loaded = _read(source, arch, step)
    where = loaded.path if loaded.kind != WORKDIR else f"{loaded.path} (step {loaded.step})"
    model_trees.check_variables(where, loaded.variables, loaded.arch)
    return loaded


def _is_packed(path: Path) -> bool:
    """A packed model file, also one whose zip directory is damaged (first member header.npy)."""
    with open(path, "rb") as f:
        head = f.read(64)
    return packed.is_packed_file(path) or (head.startswith(b"PK\x03\x04") and b"header.npy" in head)


def _read(source, arch, step) -> LoadedModel:
    if arch is not None:
        archs.check_arch(arch)
    if source is None or str(source) == "":
        raise CheckpointError("no model source given: give a training workdir, a model checkpoint "
                              "directory, a packed model file or a .pth/.pth.tar file")
    path = Path(source).absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    parts = _workdir_parts(path) if path.is_dir() else None
    if parts is None and step is not None:
        raise CheckpointError(f"{path}: holds one model; a step can be chosen in training workdirs "
                              "only (leave the step out)")
    if is_model_checkpoint(path):
        return _load_model_dir(path, arch)
    if parts is not None:
        return _load_workdir(path, parts, arch, step)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory that is neither a training workdir (with "
                              f"checkpoints/) nor a model checkpoint (with {MODEL_METADATA}); give "
                              "one of those or a model file")
    if not path.is_file():  # a pipe or a device would block or never end the reads below
        raise CheckpointError(f"{path}: not a regular file; give a model file, a model checkpoint "
                              "directory or a training workdir")
    if _is_packed(path):
        variables, found, meta = packed.read(path)
        _check(path, found, arch)
        return LoadedModel(variables, found, PACKED, str(path), meta=meta)
    variables, found, meta = torch_io.load_torch_checkpoint_with_info(path, arch)
    return LoadedModel(variables, found, PYTORCH, str(path), meta=meta)
