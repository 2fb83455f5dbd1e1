"""Loading a model from any source the tools accept, as Flax variables and the arch it holds.

Sources (`load(source, arch=None, step=None)`):
- a training workdir of `train.py` (holds `checkpoints/` and/or `best/`): by default the best
  checkpoint (`WORKDIR/best`), or the newest one in `WORKDIR/checkpoints` when `best/` is empty or
  absent; `step=N` picks step N of `WORKDIR/checkpoints` (or of `best/` when it is kept only
  there). `WORKDIR/best`, `WORKDIR/checkpoints` or one step directory `WORKDIR/checkpoints/N`
  may be given directly too;
- a model checkpoint directory (`sttn_jax.checkpoints.save_model`: converted, merged, exported);
- an original PyTorch checkpoint file (.pth/.pth.tar: a training checkpoint, {'state_dict'} or a
  bare state_dict, with or without `module.`).

The arch comes from the source itself (the checkpoint's parameter tree, the model checkpoint's
metadata, the PyTorch keys); `arch` only checks it, and a mismatch is a CheckpointError naming
both. Variables come back exactly as stored: bwx2 latent kernels are *not* clamped here
(evaluation and merging clamp them, as the original does before it binarizes).
Problems raise `sttn_jax.checkpoints.CheckpointError` with one message naming the path and the fix.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from sttn_jax import checkpoints
from sttn_jax.checkpoints import CheckpointError

ARCHS = ("resnet18_bwx2", "resnet18_ter", "resnet50")
WORKDIR = "training workdir"
MODEL_CHECKPOINT = "model checkpoint"
PYTORCH = "pytorch checkpoint"
_MANAGER_DIRS = ("best", "checkpoints")


@dataclasses.dataclass
class LoadedModel:
    """A model read from a source: its variables, its arch, and where exactly it came from."""
    variables: dict
    arch: str
    kind: str                       # WORKDIR, MODEL_CHECKPOINT or PYTORCH
    path: str                       # what was given (absolute)
    step: int | None = None         # training step (workdirs)
    checkpoint_dir: str | None = None   # the step directory read (workdirs)
    selected: str | None = None     # "best", "latest", "step" (workdirs)
    config: dict | None = None      # the workdir's config.json, when present
    meta: dict = dataclasses.field(default_factory=dict)  # checkpoint meta / model metadata

    @property
    def num_classes(self) -> int:
        return int(np.shape(self.variables["params"]["fc"]["kernel"])[-1])

    @property
    def image_size(self) -> int | None:
        """The training image size recorded with a workdir (None for other sources)."""
        size = (self.config or {}).get("image_size")
        return int(size) if isinstance(size, int) else None

    def describe(self) -> str:
        if self.kind == WORKDIR:
            how = {"best": "best checkpoint", "latest": "latest checkpoint",
                   "step": "checkpoint"}.get(self.selected, "checkpoint")
            return f"{self.arch} from {self.path} ({how}, step {self.step})"
        return f"{self.arch} from {self.kind} {self.path}"

    def info(self) -> dict:
        """A JSON-able record of the source (for reports and the metadata of derived models)."""
        out: dict[str, Any] = {"kind": self.kind, "path": self.path, "arch": self.arch,
                               "num_classes": self.num_classes}
        if self.kind == WORKDIR:
            out.update(step=self.step, selected=self.selected, checkpoint_dir=self.checkpoint_dir)
            for key in ("best_top1", "eval"):
                if self.meta.get(key) is not None:
                    out[key] = self.meta[key]
        elif self.kind == PYTORCH:
            for key in ("checkpoint_kind", "checkpoint_arch", "epoch", "best_prec1"):
                if self.meta.get(key) is not None:
                    out[key] = self.meta[key]
        return out


def check_arch(arch: str | None) -> None:
    if arch is not None and arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def arch_of_params(params) -> str | None:
    """The arch a Flax parameter tree belongs to, from its structure (None if unknown)."""
    if not hasattr(params, "get"):
        return None
    block = params.get("features_4")
    if hasattr(block, "get") and hasattr(block.get("conv1"), "get"):
        conv = block["conv1"]
        if "kernel_1" in conv:
            return "resnet18_bwx2"
        if "kernel" in conv:
            return "resnet18_ter"
    if "layer1_0" in params:
        return "resnet50"
    return None


def mismatch_error(path, found: str, wanted: str) -> CheckpointError:
    hint = (" (merge it first: python merge.py --checkpoint SRC --out DST)"
            if (found, wanted) == ("resnet18_bwx2", "resnet18_ter") else "")
    return CheckpointError(f"{path}: holds a {found} model, not {wanted}; pass --arch {found} "
                           f"or leave --arch out{hint}")


# ---------------------------------------------------------------------------------------------
# training workdirs


def is_workdir(path) -> bool:
    path = Path(path)
    return path.is_dir() and not checkpoints.is_model_checkpoint(path) and any(
        (path / d).is_dir() for d in _MANAGER_DIRS)


def _resolve_workdir(path: Path):
    """(workdir, manager dir name or None, step or None) when `path` is a workdir, one of its
    manager directories, or a step directory inside one; else None."""
    if is_workdir(path):
        return path, None, None
    if path.is_dir() and path.name in _MANAGER_DIRS and is_workdir(path.parent):
        return path.parent, path.name, None
    if (path.is_dir() and path.name.isdigit() and (path / checkpoints.TRAINING_ITEMS[0]).is_dir()
            and path.parent.name in _MANAGER_DIRS):
        return path.parent.parent, path.parent.name, int(path.name)
    return None


def workdir_steps(workdir) -> dict[str, list[int]]:
    """{"best": [...], "checkpoints": [...]}: the steps kept in each manager directory."""
    workdir = Path(workdir)
    return {d: checkpoints.training_checkpoint_steps(workdir / d) for d in _MANAGER_DIRS}


def _read_config(workdir: Path) -> dict | None:
    f = workdir / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def select_workdir_checkpoint(workdir, step: int | None = None, which: str | None = None):
    """(manager dir name, step, how) of the checkpoint to read: `step` if given (in
    `checkpoints/`, else in `best/`), else the best one, else the newest in `checkpoints/`."""
    workdir = Path(workdir)
    steps = workdir_steps(workdir)
    listing = ", ".join(f"{d}/: {steps[d] or 'none'}" for d in _MANAGER_DIRS)
    if step is not None:
        order = [which] if which else ["checkpoints", "best"]
        for d in order:
            if step in steps[d]:
                return d, step, "step"
        raise CheckpointError(f"{workdir}: no checkpoint of step {step} ({listing}); pick one of "
                              "those steps")
    if which == "checkpoints":
        if steps["checkpoints"]:
            return "checkpoints", steps["checkpoints"][-1], "latest"
    elif steps["best"]:
        return "best", steps["best"][-1], "best"
    elif which is None and steps["checkpoints"]:
        return "checkpoints", steps["checkpoints"][-1], "latest"
    raise CheckpointError(f"{workdir}: a training workdir without checkpoints ({listing}); train "
                          "first, or give a model checkpoint or a .pth file")


def load_workdir(path, arch: str | None = None, step: int | None = None) -> LoadedModel:
    path = Path(path).absolute()
    resolved = _resolve_workdir(path)
    if resolved is None:
        raise CheckpointError(f"{path}: not a training workdir (no checkpoints/ or best/)")
    workdir, which, dir_step = resolved
    if dir_step is not None:
        if step is not None and step != dir_step:
            raise CheckpointError(f"{path}: is the checkpoint of step {dir_step}, but step {step} "
                                  "was asked for")
        step = dir_step
    which, step, how = select_workdir_checkpoint(workdir, step, which)
    variables, meta = checkpoints.load_training_checkpoint(workdir / which, step)
    found = arch_of_params(variables["params"])
    if found is None:
        raise CheckpointError(f"{workdir / which / str(step)}: its parameters are not those of "
                              f"any of {', '.join(ARCHS)}")
    if arch is not None and arch != found:
        raise mismatch_error(path, found, arch)
    return LoadedModel(variables, found, WORKDIR, str(path), step=step,
                       checkpoint_dir=str(workdir / which / str(step)), selected=how,
                       config=_read_config(workdir), meta=meta)


# ---------------------------------------------------------------------------------------------
# model checkpoints and PyTorch files


def load_model_dir(path, arch: str | None = None) -> LoadedModel:
    path = Path(path).absolute()
    meta = checkpoints.read_model_metadata(path)
    found = meta.get("arch")
    if arch is not None and found is not None and arch != found:
        raise mismatch_error(path, found, arch)
    variables, found = checkpoints.load_model_checkpoint(path, arch)
    return LoadedModel(variables, found, MODEL_CHECKPOINT, str(path), meta=meta)


def load_torch_file(path, arch: str | None = None) -> LoadedModel:
    from sttn_jax.interop import names, torch_io

    path = Path(path).absolute()
    obj = torch_io.read_torch_file(path)
    state_dict, info = torch_io.extract_state_dict(obj, path)
    found = names.infer_arch(state_dict.keys())
    if arch is not None and found is not None and arch != found:
        raise mismatch_error(path, found, arch)
    variables = torch_io.state_dict_to_variables(state_dict, arch or found, path)
    meta = {"checkpoint_kind": info.get("kind"), "checkpoint_arch": info.get("arch")}
    if isinstance(obj, dict):
        for key in ("epoch", "best_prec1"):
            value = obj.get(key)
            if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
                value = value.item()
            if isinstance(value, (int, float)):
                meta[key] = value
    return LoadedModel(variables, arch or found, PYTORCH, str(path), meta=meta)


# ---------------------------------------------------------------------------------------------


def load(source, arch: str | None = None, step: int | None = None) -> LoadedModel:
    """The model at `source` (a workdir, a model checkpoint directory or a PyTorch file).

    arch: None accepts what the source holds; otherwise it must match (CheckpointError naming
    both). step: a training step, for workdirs only."""
    check_arch(arch)
    if source is None or str(source) == "":
        raise CheckpointError("no checkpoint given: pass --checkpoint (a training workdir, a model "
                              "checkpoint directory or a .pth/.pth.tar file)")
    path = Path(source).absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if checkpoints.is_model_checkpoint(path):
        if step is not None:
            raise CheckpointError(f"{path}: a model checkpoint holds one model; --step applies to "
                                  "training workdirs only")
        return load_model_dir(path, arch)
    if path.is_dir():
        if _resolve_workdir(path) is not None:
            return load_workdir(path, arch, step)
        raise CheckpointError(f"{path}: a directory that is neither a training workdir (with "
                              f"checkpoints/ or best/) nor a model checkpoint (with "
                              f"{checkpoints.MODEL_METADATA})")
    if step is not None:
        raise CheckpointError(f"{path}: a PyTorch file holds one model; --step applies to "
                              "training workdirs only")
    return load_torch_file(path, arch)
