"""tf.data input pipelines over TFDS: ImageNet (the original's transforms) and any image dataset.

TensorFlow runs on the host CPU only: importing this module hides every GPU from TensorFlow, so
it never takes accelerator memory from JAX. Nothing else in `sttn_jax` imports TensorFlow.

Transforms (torchvision in the original, REFERENCE.md "Training recipe"):
  train: Resize(resize_size, bicubic) of the shorter side, RandomCrop(image_size),
         RandomHorizontalFlip, ToTensor, Normalize(ImageNet mean/std)
  eval:  Resize(resize_size, bicubic) of the shorter side, CenterCrop(image_size), same Normalize
Here: JPEGs are decoded with libjpeg's accurate integer DCT (PIL's default: bit-identical
pixels), the resize is `tf.image.resize(bicubic, antialias=True)` (PIL's scale-dependent bicubic
kernel, a = -0.5) done as PIL does it, horizontal pass, round half up and clip to uint8, vertical
pass, round and clip; the long side is `int(size * long / short)` and the centre crop offset
`round((h - crop) / 2)` (half to even), both as torchvision computes them. Measured against PIL on
JPEGs of 32x32 .. 1200x900: about 1 value in 8,000 differs, by 1/255 (PIL's fixed-point weights).
Images smaller than the crop are upsampled by the same resize.

Determinism: a training split is cut into `num_shards` equal shards (default: one per process);
each shard is a stream of its own whose file order, shuffle buffer, crops and flips are seeded from
(seed, epoch, shard) and the example's position in that stream. Global batch b is the b-th
sub-batch of every shard, shard after shard, and process p reads (and decodes) only its shards:
p * S/P .. (p + 1) * S/P - 1. So the global batch stream is a pure function of (seed, epoch,
num_shards), whatever the number of processes that divides num_shards: one process with
num_shards=2 sees exactly the batches two processes see, and a run can resume on another number
of hosts without changing its data. One call gives one epoch (no repeat); `skip_batches=k` gives
exactly the stream without its first k batches, without decoding them.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TF = None
_TFDS = None


class DatasetNotPreparedError(ValueError):
    """The TFDS dataset has not been prepared (built) in the data directory."""


def _tf():
    """Imports TensorFlow once, hiding every GPU from it."""
    global _TF
    if _TF is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except Exception:  # noqa: BLE001 - already initialised, or no GPU support at all
            pass
        _TF = tf
    return _TF


def _tfds():
    global _TFDS
    if _TFDS is None:
        _tf()
        import tensorflow_datasets as tfds

        _TFDS = tfds
    return _TFDS


_tf()  # at import: TensorFlow must never see a GPU.


def _register_local_builders() -> None:
    """Makes the builders defined in this package (sttn_digits) known to tfds.builder."""
    from sttn_jax.data import digits  # noqa: F401  (defining the class registers it)


def _prepare_hint(name: str, data_dir) -> str:
    dd = os.fspath(data_dir) if data_dir is not None else "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    if name.split("/")[0].split(":")[0] == "imagenet2012":
        return (
            f"Dataset imagenet2012 is not prepared in data_dir {dd}. ImageNet cannot be "
            "downloaded automatically. Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            "(from https://image-net.org/download-images) in a directory DIR and run:\n"
            f"  tfds build imagenet2012 --manual_dir=DIR --data_dir={dd}\n"
            "(about 150 GB and a few hours). For a tiny fabricated stand-in, use "
            "sttn_jax.data.fabricate.ensure_fake_imagenet(data_dir)."
        )
    if name.split(":")[0] == "sttn_digits":
        return (
            f"Dataset sttn_digits is not prepared in data_dir {dd}. Build it (no download, "
            "seconds) with sttn_jax.data.digits.ensure_digits(data_dir)."
        )
    return (
        f"Dataset {name} is not prepared in data_dir {dd}, and this pipeline never downloads. "
        f"Prepare it first with:\n  tfds build {name} --data_dir={dd}"
    )


def get_builder(name: str, data_dir=None):
    """The prepared TFDS builder for `name`, or DatasetNotPreparedError saying how to prepare it."""
    tfds = _tfds()
    _register_local_builders()
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_prepare_hint(name, data_dir))
    return builder


def _split_info(builder, split):
    """builder.info.splits[split] with an error listing the available splits."""
    available = sorted(builder.info.splits.keys())
    try:
        info = builder.info.splits[split]
        info.num_examples  # noqa: B018 - resolves the instruction
        return info
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(
            f"Unknown split {split!r} for dataset {builder.info.name}: available splits are "
            f"{available} (slicing such as 'train[:10%]' is allowed)."
        ) from e


def num_examples(name: str, split: str, data_dir=None) -> int:
    """Number of examples in the whole split (all processes together)."""
    return int(_split_info(get_builder(name, data_dir), split).num_examples)


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _process_splits(split: str, process_count: int, train: bool):
    """One sub-split per process (or per shard): disjoint; equal sizes for training (the
    remainder dropped)."""
    tfds = _tfds()
    return tfds.even_splits(split, n=process_count, drop_remainder=train)


def check_num_shards(num_shards: int, process_count: int, global_batch_size: int) -> int:
    """The number of training shards, validated: a multiple of the process count that divides
    the global batch. `num_shards` 0 or None means one per process."""
    if not num_shards:
        return process_count
    if num_shards < 0 or num_shards % process_count:
        raise ValueError(f"num_shards={num_shards} must be a positive multiple of the "
                         f"{process_count} processes (each process reads whole shards)")
    if global_batch_size % num_shards:
        raise ValueError(f"global batch {global_batch_size} is not divisible by num_shards="
                         f"{num_shards} (every shard gives an equal part of each batch)")
    return int(num_shards)


def steps_per_epoch(name: str, split: str, global_batch_size: int, data_dir=None, *,
                    train: bool = True, process_count: int | None = None,
                    num_shards: int | None = None) -> int:
    """Batches per epoch, the same on every process.

    train=True: full batches only, `(N // S) // (global_batch_size // S)` for S shards (about
    N // global batch).
    train=False: the eval count, ceil(largest process shard / per-process batch): what
    `make_dataset(train=False)` yields on every process (padding batches included).
    """
    _, process_count = _process(0 if process_count is not None else None, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} "
                         "processes")
    builder = get_builder(name, data_dir)
    _split_info(builder, split)
    if train:
        num_shards = check_num_shards(num_shards, process_count, global_batch_size)
        shard = _process_splits(split, num_shards, True)[0]
        return int(builder.info.splits[shard].num_examples) // (global_batch_size // num_shards)
    per_process = global_batch_size // process_count
    sizes = [int(builder.info.splits[s].num_examples)
             for s in _process_splits(split, process_count, train)]
    return math.ceil(max(sizes) / per_process)


def _derive_seed(*values: int) -> int:
    """A 31-bit seed, a pure function of the integers given."""
    ints = [int(v) % (1 << 63) for v in values]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint32)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Transforms (public: tests and other tools use them on single images).


def _normalization(normalize) -> tuple[Any, Any] | None:
    if normalize is None or (isinstance(normalize, str) and normalize.lower() == "none"):
        return None
    if isinstance(normalize, str):
        if normalize.lower() != "imagenet":
            raise ValueError(f"normalize must be 'imagenet', None or 'none', got {normalize!r}")
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = normalize  # an explicit (mean, std) pair
    return tuple(mean), tuple(std)


def default_resize_size(image_size: int) -> int:
    """256 at 224 (the original): round(image_size * 256 / 224)."""
    return int(round(image_size * 256 / 224))


def resize_shorter_side(image, size: int):
    """torchvision Resize(size, BICUBIC) on a PIL image: HWC uint8 -> HWC float32 in 0..255.

    The shorter side becomes `size`, the longer `int(size * long / short)`; like PIL, a horizontal
    then a vertical pass, each rounded and clipped to uint8 values.
    """
    tf = _tf()
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float64)
    w = tf.cast(shape[1], tf.float64)
    s = tf.constant(float(size), tf.float64)
    new_h = tf.where(h <= w, s, tf.floor(s * h / w))
    new_w = tf.where(h <= w, tf.floor(s * w / h), s)
    new_h = tf.cast(new_h, tf.int32)
    new_w = tf.cast(new_w, tf.int32)

    def resample(x, hw):
        x = tf.image.resize(x, hw, method="bicubic", antialias=True)
        return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)  # PIL rounds half up

    # PIL resamples horizontally, rounds to uint8, then vertically: two passes, as PIL does.
    out = resample(tf.cast(image, tf.float32), tf.stack([shape[0], new_w]))
    return resample(out, tf.stack([new_h, new_w]))


def _to_output(image, normalize):
    """0..255 float -> ToTensor() scale, then Normalize."""
    tf = _tf()
    image = image / 255.0
    norm = _normalization(normalize)
    if norm is not None:
        mean, std = norm
        image = (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return image


def preprocess_for_eval(image, *, image_size: int = 224, resize_size: int | None = None,
                        normalize="imagenet"):
    """Resize shorter side (bicubic), CenterCrop(image_size), scale to [0,1], normalise."""
    tf = _tf()
    resize_size = resize_size or default_resize_size(image_size)
    image = resize_shorter_side(image, resize_size)
    shape = tf.shape(image)
    # torchvision: int(round((h - crop) / 2)), Python's round (half to even) = tf.round.
    top = tf.cast(tf.round(tf.cast(shape[0] - image_size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[1] - image_size, tf.float64) / 2.0), tf.int32)
    image = image[top:top + image_size, left:left + image_size]
    image = tf.ensure_shape(image, (image_size, image_size, 3))
    return _to_output(image, normalize)


def preprocess_for_train(image, seed, *, image_size: int = 224, resize_size: int | None = None,
                         normalize="imagenet", random_flip: bool = True):
    """Resize shorter side (bicubic), RandomCrop, RandomHorizontalFlip(0.5), scale, normalise.
    `random_flip=False` drops the flip (for data where mirroring changes the class, e.g. digits).

    `seed`: an int64 tensor of shape (2,), for stateless random ops.
    """
    tf = _tf()
    resize_size = resize_size or default_resize_size(image_size)
    image = resize_shorter_side(image, resize_size)
    shape = tf.shape(image)
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    top = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=shape[0] - image_size + 1,
                                      dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=shape[1] - image_size + 1,
                                       dtype=tf.int32)
    image = image[top:top + image_size, left:left + image_size]
    flip = tf.random.stateless_uniform([], seeds[2]) < (0.5 if random_flip else 0.0)
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    image = tf.ensure_shape(image, (image_size, image_size, 3))
    return _to_output(image, normalize)


def _decode_fn(builder):
    """(decoders for as_dataset, fn: raw image feature -> HWC uint8 RGB tensor)."""
    tf = _tf()
    tfds = _tfds()
    feature = builder.info.features["image"]
    if isinstance(feature, tfds.features.Image):

        def decode(encoded):
            # JPEG: libjpeg's accurate integer DCT, as PIL decodes; anything else (PNG, ...).
            return tf.cond(
                tf.io.is_jpeg(encoded),
                lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
                lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
            )

        return {"image": tfds.decode.SkipDecoding()}, decode

    def convert(image):
        image = tf.convert_to_tensor(image)
        if image.dtype != tf.uint8:
            image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
        if image.shape.rank == 2:
            image = image[..., None]
        return tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                       lambda: image[..., :3])

    return None, convert


# ---------------------------------------------------------------------------------------------


def make_dataset(name: str, split: str, *, batch_size: int, train: bool, image_size: int = 224,
                 resize_size: int | None = None, seed: int = 0, epoch: int = 0, data_dir=None,
                 process_index: int | None = None, process_count: int | None = None,
                 skip_batches: int = 0, shuffle_buffer: int | None = None,
                 normalize="imagenet", random_flip: bool = True, num_shards: int | None = None):
    """One epoch of this process's part of `name`/`split` as a batched tf.data.Dataset.

    Elements: {"image": float32 (batch_size, image_size, image_size, 3), "label": int32
    (batch_size,), "mask": float32 (batch_size,), 1 for real examples}. `batch_size` is the
    per-process batch.

    train=True: this epoch's shuffle, random crop and flip, full batches only (drop remainder),
    every process the same number of batches. The split is read as `num_shards` shards (default
    one per process; see the module docstring): the global batch stream depends on (seed, epoch,
    num_shards) and not on the number of processes.
    train=False: read order, centre crop; the last batch is padded with zero images and mask 0,
    and processes with fewer batches get all-padding batches, so every process yields
    `steps_per_epoch(..., train=False)` batches of the same shape and every example is counted
    exactly once across processes.
    """
    tf = _tf()
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    process_index, process_count = _process(process_index, process_count)
    resize_size = resize_size or default_resize_size(image_size)
    if resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} is smaller than image_size {image_size}")
    _normalization(normalize)  # validates

    builder = get_builder(name, data_dir)
    _split_info(builder, split)
    decoders, decode = _decode_fn(builder)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    autotune = tf.data.AUTOTUNE

    if train:
        global_batch = batch_size * process_count
        num_shards = check_num_shards(num_shards, process_count, global_batch)
        per_process_shards = num_shards // process_count
        shards = _process_splits(split, num_shards, True)
        first = process_index * per_process_shards
        streams = [
            _train_shard_stream(builder, shards[s], s, decoders, decode, options,
                                batch_size=batch_size // per_process_shards, seed=seed,
                                epoch=epoch, skip_batches=skip_batches,
                                shuffle_buffer=shuffle_buffer, image_size=image_size,
                                resize_size=resize_size, normalize=normalize,
                                random_flip=random_flip)
            for s in range(first, first + per_process_shards)]
        if len(streams) == 1:
            ds = streams[0]
        else:  # this process's part of each global batch: its shards' sub-batches in order
            ds = tf.data.Dataset.zip(tuple(streams)).map(
                lambda *parts: {k: tf.concat([b[k] for b in parts], axis=0) for k in parts[0]},
                num_parallel_calls=autotune, deterministic=True)
    else:
        subsplits = _process_splits(split, process_count, False)
        shard = subsplits[process_index]
        shard_size = int(builder.info.splits[shard].num_examples)
        ds = _read(builder, shard, decoders, options, shuffle_seed=None)
        ds = ds.skip(skip_batches * batch_size)

        def eval_map(image, label):
            image = preprocess_for_eval(decode(image), image_size=image_size,
                                        resize_size=resize_size, normalize=normalize)
            return {"image": image, "label": label, "mask": tf.constant(1.0, tf.float32)}

        ds = ds.map(eval_map, num_parallel_calls=autotune, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=False, num_parallel_calls=autotune,
                      deterministic=True)

        def pad(batch):
            n = tf.shape(batch["label"])[0]
            k = batch_size - n
            return {
                "image": tf.pad(batch["image"], [[0, k], [0, 0], [0, 0], [0, 0]]),
                "label": tf.pad(batch["label"], [[0, k]]),
                "mask": tf.pad(batch["mask"], [[0, k]]),
            }

        ds = ds.map(pad, num_parallel_calls=autotune, deterministic=True)
        # Every process yields the same number of batches (the largest shard's count).
        sizes = [int(builder.info.splits[s].num_examples) for s in subsplits]
        target = max(0, math.ceil(max(sizes) / batch_size) - skip_batches)
        mine = max(0, math.ceil(shard_size / batch_size) - skip_batches)
        if target > mine:
            zeros = {
                "image": tf.zeros((batch_size, image_size, image_size, 3), tf.float32),
                "label": tf.zeros((batch_size,), tf.int32),
                "mask": tf.zeros((batch_size,), tf.float32),
            }
            ds = ds.concatenate(tf.data.Dataset.from_tensors(zeros).repeat(target - mine))
        ds = ds.apply(tf.data.experimental.assert_cardinality(target))

    ds = ds.prefetch(autotune)
    return ds.with_options(options)


def _read(builder, subsplit, decoders, options, shuffle_seed):
    """(encoded image, int32 label) records of one sub-split; files shuffled when seeded."""
    tf, tfds = _tf(), _tfds()
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                  shuffle_reshuffle_each_iteration=False, options=options)
    ds = builder.as_dataset(split=subsplit, shuffle_files=shuffle_seed is not None,
                            decoders=decoders, read_config=read_config)
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)),
                  num_parallel_calls=tf.data.AUTOTUNE)


def _train_shard_stream(builder, subsplit, shard: int, decoders, decode, options, *,
                        batch_size: int, seed: int, epoch: int, skip_batches: int,
                        shuffle_buffer, image_size: int, resize_size: int, normalize,
                        random_flip: bool):
    """One training shard's epoch: shuffled, cropped, flipped and batched, every random choice
    seeded from (seed, epoch, shard) and the example's position, so it never depends on which
    process reads the shard."""
    tf = _tf()
    autotune = tf.data.AUTOTUNE
    ds = _read(builder, subsplit, decoders, options, shuffle_seed=_derive_seed(seed, epoch, 1, shard))
    shard_size = int(builder.info.splits[subsplit].num_examples)
    buffer = shuffle_buffer or 16 * batch_size
    buffer = max(1, min(buffer, shard_size))
    ds = ds.shuffle(buffer, seed=_derive_seed(seed, epoch, 2, shard), reshuffle_each_iteration=False)
    ds = ds.enumerate()
    ds = ds.skip(skip_batches * batch_size)  # before decoding: exact, and cheap
    base_seed = tf.constant(
        [_derive_seed(seed, epoch, 3, shard), _derive_seed(seed, epoch, 4, shard)], tf.int64)

    def train_map(index, image_label):
        image, label = image_label
        ex_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        image = preprocess_for_train(decode(image), ex_seed, image_size=image_size,
                                     resize_size=resize_size, normalize=normalize,
                                     random_flip=random_flip)
        return {"image": image, "label": label, "mask": tf.constant(1.0, tf.float32)}

    ds = ds.map(train_map, num_parallel_calls=autotune, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True, num_parallel_calls=autotune,
                    deterministic=True)


def as_numpy(ds):
    """Iterates a dataset as dicts of numpy arrays."""
    return _tfds().as_numpy(ds)
