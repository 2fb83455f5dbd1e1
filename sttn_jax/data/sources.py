"""The TFDS datasets behind the pipelines (never downloaded), their splits and shards, and the
checks and preparation a run needs first. Each process reads whole shards of a training split;
global batch b is the b-th sub-batch of every shard, so it does not depend on the process count.
"""

import dataclasses
import difflib
import math
import os
import re

import jax

from sttn_jax import processes
from sttn_jax.data import digits, fabricate, transforms
from sttn_jax.data.tf_import import tfds
from sttn_jax.errors import ConfigError, DatasetNotPreparedError


def _prepare_hint(name: str, data_dir) -> str:
    dd = data_dir if data_dir is not None else "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    base = name.split("/")[0].split(":")[0]
    if base == "imagenet2012":
        return (f"Dataset imagenet2012 is not prepared in data_dir {dd}. ImageNet cannot be "
                "downloaded automatically. Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                "(from https://image-net.org/download-images) in a directory DIR and run:\n"
                f"  tfds build imagenet2012 --manual_dir=DIR --data_dir={dd}\n"
                "(about 150 GB and a few hours). For a tiny fabricated stand-in, set "
                "--config.fabricate_data=True.")
    if base == "sttn_digits":
        return (f"Dataset sttn_digits is not prepared in data_dir {dd}. Build it (no download, "
                "seconds) with sttn_jax.data.digits.ensure_digits(data_dir).")
    return (f"Dataset {name} is not prepared in data_dir {dd}, and this pipeline never downloads. "
            f"Prepare it first with:\n  tfds build {name} --data_dir={dd}")


def get_builder(name: str, data_dir=None):
    """The prepared TFDS builder for `name`, or DatasetNotPreparedError saying how to prepare it."""
    digits.register()
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    builder = tfds().builder(name, data_dir=data_dir, try_gcs=False)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_prepare_hint(name, data_dir))
    return builder


def config_builder(config):
    """`get_builder` for config.dataset; config.data_dir "" means TFDS's default directory."""
    return get_builder(config.dataset, config.data_dir or None)


def split_examples(builder, split) -> int:
    """Examples in `split` (slices such as 'train[:10%]' allowed); ValueError listing the splits."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"Unknown split {split!r} for dataset {builder.info.name}: available "
                         f"splits are {sorted(builder.info.splits.keys())} (slicing such as "
                         "'train[:10%]' is allowed).") from e


def num_examples(name: str, split: str, data_dir=None) -> int:
    """Number of examples in the whole split (all processes together)."""
    return split_examples(get_builder(name, data_dir), split)


def process_of(process_index=None, process_count=None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    return index, count


@dataclasses.dataclass(frozen=True)
class TrainLayout:
    """How one process reads the training split: its shards and the batch each gives."""
    shards: tuple[str, ...]        # this process's sub-splits, in order
    first_shard: int               # the global index of shards[0]
    shard_batch: int               # examples per shard in every global batch
    steps_per_epoch: int           # full global batches per epoch (the same on every process)


def train_layout(config, process_index=None, process_count=None) -> TrainLayout:
    """The shards of config.train_split this process reads (ConfigError for bad data_shards)."""
    index, count = process_of(process_index, process_count)
    num_shards = config.data_shards or count
    if num_shards < 0 or num_shards % count:
        raise ConfigError(f"config.data_shards={config.data_shards} must be a positive multiple of "
                          f"the {count} processes (each process reads whole shards)")
    if config.batch_size % num_shards:
        raise ConfigError(f"config.data_shards={num_shards} does not divide the global batch "
                          f"{config.batch_size} (every shard gives an equal part of each batch)")
    builder = config_builder(config)
    total = split_examples(builder, config.train_split)
    shards = tfds().even_splits(config.train_split, n=num_shards, drop_remainder=True)
    shard_batch = config.batch_size // num_shards
    steps = split_examples(builder, shards[0]) // shard_batch
    if steps == 0:
        raise ConfigError(f"the {config.train_split} split has {total} examples, fewer than one "
                          f"batch of {config.batch_size}; lower --config.batch_size")
    mine = num_shards // count
    return TrainLayout(tuple(shards[index * mine:(index + 1) * mine]), index * mine, shard_batch,
                       steps)


def eval_steps(config, split: str, process_count=None) -> int:
    """Batches every process yields for `split` (the shorter parts padded with masked batches)."""
    count = process_count or jax.process_count()
    builder = config_builder(config)
    split_examples(builder, split)
    parts = tfds().even_splits(split, n=count, drop_remainder=False)
    sizes = [split_examples(builder, s) for s in parts]
    return math.ceil(max(sizes) / (config.eval_batch_size // count))


def prepare(config) -> None:
    """Builds the data sets sttn-jax can make itself on process 0, the others waiting."""
    if config.fabricate_data and config.dataset != "imagenet2012":
        raise ConfigError("config.fabricate_data fabricates an imagenet2012; set "
                          "--config.dataset=imagenet2012 or --config.fabricate_data=False")
    ensure = (fabricate.ensure_fake_imagenet if config.fabricate_data
              else digits.ensure_digits if config.dataset == "sttn_digits" else None)
    if ensure is None:
        return
    if jax.process_index() == 0:
        ensure(config.data_dir)
    processes.wait_for_all("data prepared")


def check(config, split_keys=("train_split", "eval_split")) -> None:
    """Opens config.dataset and the splits named by `split_keys` before anything is built (a typo
    would otherwise surface after an epoch); ConfigError names the key and the choices."""
    if config.input_mode not in transforms.MODES:
        raise ConfigError(f"config.input_mode={config.input_mode!r}: choose one of "
                          f"{', '.join(transforms.MODES)}")
    name = config.dataset
    try:
        builder = config_builder(config)
    except DatasetNotPreparedError:
        raise
    except (ValueError, AssertionError) as e:  # tfds: DatasetNotFoundError, unknown version
        text = str(e)
        if type(e).__name__ == "DatasetNotFoundError":
            guess = re.search(r"Did you mean: \S+ -> (\S+) \?", text)
            why = "is not a dataset TFDS knows" + (f" (did you mean {guess[1]}?)" if guess else "")
        else:
            why = "cannot be opened: " + (text.strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config.dataset={name!r} {why}; set --config.dataset to a TFDS "
                          "dataset name (e.g. imagenet2012, or sttn_digits for the demo)") from None
    available = sorted(builder.info.splits.keys())
    for key in split_keys:
        split = config[key]
        try:
            split_examples(builder, split)
        except ValueError:
            close = difflib.get_close_matches(str(split).split("[")[0], available, n=1)
            raise ConfigError(
                f"config.{key}={split!r} is not a split of {name} in {builder.data_dir}: its "
                f"splits are {available} (slices such as 'train[:10%]' work too); set "
                f"--config.{key}={close[0] if close else '...'}") from None
