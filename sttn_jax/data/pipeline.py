"""The input pipelines: tf.data over TFDS, one epoch of this process's batches at a time.
Training shards are seeded from (seed, epoch, shard): the global batches are a pure function of
(seed, epoch, data_shards) and `skip_batches` resumes exactly. Evaluation pads with zero images of
mask 0: every process yields `sources.eval_steps` batches and every example counts once.
"""

import threading

import numpy as np

from sttn_jax.data import sources, tf_import, transforms
from sttn_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported


def _derive_seed(*values: int) -> int:
    """A 31-bit seed, a pure function of the integers given."""
    ints = [int(v) % (1 << 63) for v in values]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint32)[0] >> 1)


def _as_rgb(image):
    """A non-encoded image feature as HWC uint8 RGB."""
    tf = tf_import.tf()
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
    if image.shape.rank == 2:
        image = image[..., None]
    return tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                   lambda: image[..., :3])


def _transform(builder, config, train: bool):
    """(decoders for as_dataset, (image[, seed]) -> transform); encoded images stay encoded."""
    tfds = tf_import.tfds()
    kw = dict(image_size=config.image_size, resize_size=config.resize_size or None)
    if train:
        kw.update(random_flip=config.random_flip, mode=config.input_mode)
    if isinstance(builder.info.features["image"], tfds.features.Image):
        fn = (transforms.preprocess_encoded_for_train if train
              else transforms.preprocess_encoded_for_eval)
        return {"image": tfds.decode.SkipDecoding()}, lambda image, *seed: fn(image, *seed, **kw)
    fn = transforms.preprocess_for_train if train else transforms.preprocess_for_eval
    return None, lambda image, *seed: fn(_as_rgb(image), *seed, **kw)


def _map(ds, fn):
    """ds.map(fn) in parallel, in order, without AutoGraph: the transforms use tf.cond, and the
    conversion is slow and leaves generated sources behind in killed runs."""
    tf = tf_import.tf()
    return ds.map(tf.autograph.experimental.do_not_convert(fn),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _options():
    options = tf_import.tf().data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


def _read(builder, split, decoders, shuffle_seed=None):
    """(encoded image, int32 label) records of one (sub-)split; files shuffled when seeded."""
    tf, tfds = tf_import.tf(), tf_import.tfds()
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
                                  options=_options())
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                            decoders=decoders, read_config=read_config)
    return _map(ds, lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))


def make_train_dataset(config, *, epoch: int = 0, skip_batches: int = 0, process_index=None,
                       process_count=None):
    """One training epoch of this process's part of every global batch of config.train_split."""
    tf = tf_import.tf()
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    layout = sources.train_layout(config, process_index, process_count)
    builder = sources.config_builder(config)
    decoders, transform = _transform(builder, config, train=True)
    streams = []
    for i, shard in enumerate(layout.shards):
        seed = lambda k: _derive_seed(config.seed, epoch, k, layout.first_shard + i)  # noqa: E731
        ds = _read(builder, shard, decoders, shuffle_seed=seed(1))
        buffer = max(1, min(config.shuffle_buffer or 16 * layout.shard_batch,
                            sources.split_examples(builder, shard)))
        ds = ds.shuffle(buffer, seed=seed(2), reshuffle_each_iteration=False)
        ds = ds.enumerate().skip(skip_batches * layout.shard_batch)  # before decoding: cheap
        base = tf.constant([seed(3), seed(4)], tf.int64)

        def train_map(index, record, base=base):
            image, label = record
            image = transform(image, tf.random.experimental.stateless_fold_in(base, index))
            return {"image": image, "label": label, "mask": tf.constant(1.0, tf.float32)}

        ds = _map(ds, train_map)
        streams.append(ds.batch(layout.shard_batch, drop_remainder=True,
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
    ds = streams[0]
    if len(streams) > 1:  # this process's part of each global batch: its shards' parts in order
        ds = _map(tf.data.Dataset.zip(tuple(streams)),
                  lambda *parts: {k: tf.concat([p[k] for p in parts], axis=0) for k in parts[0]})
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def numpy_batches(ds):
    """Yields `ds.as_numpy_iterator()`'s elements; the spent iterator is deleted on a helper
    thread, since deleting it can wait up to a minute for its autotuning thread."""
    iterator = ds.as_numpy_iterator()
    try:
        yield from iterator
    finally:
        spent = [iterator]
        del iterator
        threading.Thread(target=spent.clear, name="release spent tf.data iterator",
                         daemon=True).start()


def make_eval_dataset(config, split: str | None = None, *, process_index=None, process_count=None):
    """This process's part of `split` (default config.eval_split), centre-cropped, padded."""
    tf = tf_import.tf()
    split = split or config.eval_split
    index, count = sources.process_of(process_index, process_count)
    batch = config.eval_batch_size // count
    builder = sources.config_builder(config)
    decoders, transform = _transform(builder, config, train=False)
    sources.split_examples(builder, split)  # an unknown split: one message listing the splits
    parts = tf_import.tfds().even_splits(split, n=count, drop_remainder=False)
    ds = _map(_read(builder, parts[index], decoders),
              lambda image, label: {"image": transform(image), "label": label,
                                    "mask": tf.constant(1.0, tf.float32)})
    # Zero examples of mask 0 fill the last batch and make every process yield `steps` batches.
    steps = sources.eval_steps(config, split, count)
    padding = steps * batch - sources.split_examples(builder, parts[index])
    zero = {"image": tf.zeros((config.image_size, config.image_size, 3), tf.float32),
            "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0, tf.float32)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(zero).repeat(padding))
    ds = ds.batch(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
