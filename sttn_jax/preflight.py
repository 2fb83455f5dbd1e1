"""Everything a training run checks and prepares before its first step, so that bad input is
refused up front in one line that names the fix: config values, the workdir (writable, not on a
full disk), the dataset and both splits, and the teacher checkpoint (its arch and classes).
"""
from __future__ import annotations

import difflib
import errno
import os
import re
from pathlib import Path

import jax
import numpy as np

from sttn_jax import checkpoints, data, models, training


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def validate_model_config(config) -> None:
    """The checks training and evaluation share: dtype, image and resize sizes."""
    if config.dtype not in training.DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}: choose one of {sorted(training.DTYPES)}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("config.dtype='float64' needs JAX_ENABLE_X64=1 in the environment")
    if config.image_size < models.MIN_IMAGE_SIZE:
        raise ConfigError(f"config.image_size={config.image_size}: images must be at least "
                          f"{models.MIN_IMAGE_SIZE} (the network downsamples 32x); use "
                          f"--config.image_size={models.MIN_IMAGE_SIZE} or more")
    if config.resize_size < config.image_size:
        raise ConfigError(f"config.resize_size={config.resize_size} is below image_size="
                          f"{config.image_size}; the crop must fit: use resize_size >= image_size")


def validate_config(config, num_devices: int) -> None:
    """Refuses bad values up front, each with a one-line message that names the fix."""
    if config.arch not in ("resnet18_bwx2", "resnet18_ter"):
        raise ConfigError(f"config.arch={config.arch!r}: train.py trains 'resnet18_bwx2' (or "
                          "'resnet18_ter' as a plain network); set --config.arch=resnet18_bwx2")
    validate_model_config(config)
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value <= 0:
            raise ConfigError(f"config.{key}={value} must be positive")
        try:
            training.check_batch_divisible(value, num_devices, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if config.num_epochs <= 0 and config.num_train_steps <= 0:
        raise ConfigError("set config.num_epochs or config.num_train_steps to a positive number")
    if config.checkpoint_every_steps <= 0:
        raise ConfigError("config.checkpoint_every_steps must be positive")
    if config.teacher_checkpoint and not os.path.exists(config.teacher_checkpoint):
        raise ConfigError(f"config.teacher_checkpoint={config.teacher_checkpoint!r} does not exist")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def check_workdir_writable(workdir: Path) -> None:
    """Fails at start-up, not at the first save, when the workdir cannot be written (whether it
    has room for a checkpoint is `check_checkpoint_space`, once the state's size is known)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{jax.process_index()}.{os.getpid()}"  # one per process
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise ConfigError(f"workdir {workdir} is on a full disk ({e.strerror}); free some "
                              "space there or pick another --workdir") from None
        raise ConfigError(f"workdir {workdir} is not writable ({e.strerror or e}); pick another "
                          "--workdir or fix its permissions") from None


def check_checkpoint_space(workdir: Path, abstract_state) -> None:
    """Refuses a workdir whose disk cannot take one more checkpoint of this run (parameters, Adam
    moments, statistics: `abstract_state`'s bytes): it would otherwise fail at the first save,
    perhaps hours in. Orbax deletes the oldest checkpoint only after the new one is written."""
    need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(abstract_state))
    free = _free_bytes(workdir)
    if free < need:
        raise ConfigError(f"workdir {workdir} has {free >> 20} MiB free but one checkpoint of this "
                          f"run takes {need >> 20} MiB; free some space or pick another --workdir")


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def load_teacher(config):
    """Teacher variables from a torchvision .pth (via interop) or a converted model checkpoint.

    The arch the file holds and its class count are checked against config.teacher_arch and
    config.num_classes here, before any training: a wrong file would otherwise fail inside the
    first compiled step with a shape error, or (through the loaders' own messages) suggest an
    `--arch` flag train.py does not have."""
    path, want = config.teacher_checkpoint, config.teacher_arch
    if want not in models.ARCHS:
        raise ConfigError(f"config.teacher_arch={want!r}: choose one of {list(models.ARCHS)} "
                          "(the usual teacher is --config.teacher_arch=resnet50)")
    if checkpoints.is_model_checkpoint(path):
        found = checkpoints.read_model_metadata(path).get("arch")
        _check_teacher_arch(path, found, want)
        variables, _ = checkpoints.load_model_checkpoint(path, arch=want)
    else:
        from sttn_jax import interop

        state_dict, _ = interop.read_state_dict(path)
        _check_teacher_arch(path, _torch_arch(state_dict.keys()), want)
        variables = interop.state_dict_to_variables(state_dict, want, path)
    classes = int(variables["params"]["fc"]["kernel"].shape[-1])
    if classes != config.num_classes:
        raise checkpoints.CheckpointError(
            f"teacher {path} has {classes} classes but config.num_classes={config.num_classes}; "
            f"give a teacher trained on the same {config.num_classes} classes "
            f"(--config.teacher_checkpoint=...) or set --config.num_classes={classes}")
    return variables


def _check_teacher_arch(path, found, want) -> None:
    if found is None or found == want:
        return  # unknown layouts get the loader's own key-by-key message
    fix = f"set --config.teacher_checkpoint to a {want} checkpoint"
    if want == "resnet50":
        fix += " (e.g. torchvision's resnet50-0676ba61.pth)"
    if found in models.ARCHS:
        fix += f", or --config.teacher_arch={found} if this model is the teacher you mean"
    raise checkpoints.CheckpointError(f"teacher checkpoint {path} holds a {found} model but "
                                      f"config.teacher_arch={want!r}; {fix}")


def _torch_arch(keys):
    """The arch of a torch state_dict: an sttn-jax arch name, another torchvision ResNet such as
    'resnet18' (to name it in the message), or None when the keys say nothing clear."""
    from sttn_jax.interop import names

    return names.infer_arch(keys) or names.torchvision_resnet(keys)


def data_dir(config):
    return config.data_dir or None


def prepare_data(config) -> None:
    if config.fabricate_data:
        if config.dataset != "imagenet2012":
            raise ConfigError("config.fabricate_data fabricates an imagenet2012; set "
                              "--config.dataset=imagenet2012 or --config.fabricate_data=False")
        if jax.process_index() == 0:
            data.ensure_fake_imagenet(config.data_dir)
    elif config.dataset == "sttn_digits":
        if jax.process_index() == 0:
            data.ensure_digits(config.data_dir)
    else:
        return
    if jax.process_count() > 1:  # the other processes read only what process 0 has finished
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sttn_jax:data_prepared")


def check_data(config, split_keys=("train_split", "eval_split")) -> None:
    """Opens config.dataset and its splits (the config keys in `split_keys`) before anything is
    built or trained.

    Without it a typo in --config.eval_split surfaces only at the first evaluation, after an
    epoch of training, and a dataset name TFDS does not know gives its multi-page list of every
    dataset. Raises ConfigError naming the key and the choices, or DatasetNotPreparedError
    saying how to prepare the data."""
    name = config.dataset
    try:
        builder = data.get_builder(name, data_dir(config))
    except data.DatasetNotPreparedError:
        raise
    except (ValueError, AssertionError) as e:  # tfds: DatasetNotFoundError, unknown version
        text = str(e)
        guess = re.search(r"Did you mean: \S+ -> (\S+) \?", text)
        if type(e).__name__ == "DatasetNotFoundError":
            why = "is not a dataset TFDS knows" + (f" (did you mean {guess.group(1)}?)"
                                                  if guess else "")
        else:
            why = "cannot be opened: " + (text.strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config.dataset={name!r} {why}; set --config.dataset to a TFDS "
                          "dataset name (e.g. imagenet2012, or sttn_digits for the demo)") from None
    available = sorted(builder.info.splits.keys())
    for key in split_keys:
        split = config[key]
        try:
            data.num_examples(name, split, data_dir(config))
        except data.DatasetNotPreparedError:
            raise
        except ValueError:
            close = difflib.get_close_matches(str(split).split("[")[0], available, n=1)
            raise ConfigError(
                f"config.{key}={split!r} is not a split of {name} in {builder.data_dir}: its "
                f"splits are {available} (slices such as 'train[:10%]' work too); set "
                f"--config.{key}={close[0] if close else '...'}") from None
