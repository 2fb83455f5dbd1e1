"""The data sets and pipelines: a fabricated ILSVRC2012 prepared by the real TFDS imagenet2012
builder, the embedded digits builder, determinism, resume, shards per process and eval padding.
(The per-image transforms against PIL: test_transforms.py.)"""
import collections
import hashlib
import queue
import threading
import types

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from sttn_jax.data import digits, fabricate, pipeline, sources  # noqa: E402
from sttn_jax.errors import ConfigError, DatasetNotPreparedError  # noqa: E402

MEAN = np.array(pipeline.IMAGENET_MEAN, np.float32)
STD = np.array(pipeline.IMAGENET_STD, np.float32)
NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 6, 2


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_imagenet")
    info = fabricate.fabricate_imagenet(root / "manual", num_classes=NUM_CLASSES,
                                        train_per_class=TRAIN_PER_CLASS,
                                        val_per_class=VAL_PER_CLASS)
    fabricate.prepare_imagenet(root / "data", root / "manual", num_shards=3)
    info["data_dir"] = str(root / "data")
    return info


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("digits")
    assert digits.ensure_digits(data_dir) is True
    assert digits.ensure_digits(data_dir) is False  # second call: already there
    return str(data_dir)


def data_config(data_dir, dataset="imagenet2012", **overrides):
    """configs/default.py reading `dataset` from `data_dir` at 32x32 (shorter side resized to 37)."""
    from configs import default

    c = default.get_config()
    c.dataset, c.data_dir, c.image_size, c.resize_size = dataset, str(data_dir), 32, 37
    for k, v in overrides.items():
        c[k] = v
    return c


def batches(name, split, data_dir, *, batch_size, train, process_index=0, process_count=1,
            epoch=0, skip_batches=0, **overrides):
    """This process's batches of `split` (train or eval pipeline), `batch_size` per process."""
    global_batch = batch_size * process_count
    c = data_config(data_dir, name, batch_size=global_batch, eval_batch_size=global_batch,
                    **{"train_split" if train else "eval_split": split}, **overrides)
    if train:
        ds = pipeline.make_train_dataset(c, epoch=epoch, skip_batches=skip_batches,
                                         process_index=process_index, process_count=process_count)
    else:
        ds = pipeline.make_eval_dataset(c, process_index=process_index, process_count=process_count)
    return list(pipeline.numpy_batches(ds))


def stack(bs, key):
    return np.concatenate([b[key] for b in bs])


def fingerprints(bs):
    """One fingerprint per real (mask 1) example."""
    out = []
    for b in bs:
        for img, m in zip(b["image"], b["mask"]):
            if m:
                out.append(hashlib.sha1(np.round(img, 4).tobytes()).hexdigest())
    return out


class _RecordsItsDeletion:
    """An iterator that puts the name of the thread that deletes it into `deleted_by`."""

    def __init__(self, items, deleted_by):
        self.items, self.deleted_by = iter(items), deleted_by

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.items)

    def __del__(self):
        self.deleted_by.put(threading.current_thread().name)


@pytest.mark.parametrize("closed_early", [False, True])
def test_numpy_batches_delete_the_spent_iterator_off_the_loop(closed_early):
    deleted_by = queue.Queue()
    ds = types.SimpleNamespace(as_numpy_iterator=lambda: _RecordsItsDeletion([1, 2, 3], deleted_by))
    gen = pipeline.numpy_batches(ds)
    if closed_early:  # a loop left with break: the generator is closed
        assert next(gen) == 1
        gen.close()
    else:
        assert list(gen) == [1, 2, 3]
    assert deleted_by.get(timeout=30) == "release spent tf.data iterator"


# --- the fabricated ImageNet, through the real builder ------------------------------------------

def test_fabricated_counts_and_synsets(fake_imagenet):
    d = fake_imagenet["data_dir"]
    assert sources.num_examples("imagenet2012", "train", d) == NUM_CLASSES * TRAIN_PER_CLASS
    assert sources.num_examples("imagenet2012", "validation", d) == NUM_CLASSES * VAL_PER_CLASS
    assert fake_imagenet["synsets"] == fabricate.imagenet_synsets()[:NUM_CLASSES]
    assert fake_imagenet["synsets"][0] == "n01440764"
    c = data_config(d, batch_size=8)
    assert sources.train_layout(c, 0, 1).steps_per_epoch == 3
    assert sources.train_layout(c, 1, 2).steps_per_epoch == 3
    # eval: 8 examples, 2 processes of 3 -> shards of 4 -> 2 batches each (one padded)
    assert sources.eval_steps(data_config(d, eval_batch_size=6), "validation", 2) == 2


@pytest.mark.parametrize("split,train", [("train", False), ("validation", False), ("train", True)])
def test_labels_match_image_content(fake_imagenet, split, train):
    """Every image is in its label's colour: validation labels line up with the fabricated images
    (the builder assigns them by position in the sorted val tar), and the training pipeline's
    random crops keep each image with its own label."""
    bs = batches("imagenet2012", split, fake_imagenet["data_dir"], batch_size=4, train=train)
    labels = stack(bs, "label")[stack(bs, "mask") > 0]
    raw = stack(bs, "image")[stack(bs, "mask") > 0] * STD + MEAN  # undo Normalize
    colours = raw.mean(axis=(1, 2)) * 255
    palette = np.stack([fabricate._class_colour(c, NUM_CLASSES) * 0.75
                        for c in range(NUM_CLASSES)])
    nearest = np.argmin(((colours[:, None] - palette[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, labels)
    if train:  # full batches only: 24 examples, 6 batches of 4
        assert len(labels) == NUM_CLASSES * TRAIN_PER_CLASS
    expected = TRAIN_PER_CLASS if split == "train" else VAL_PER_CLASS
    assert collections.Counter(labels.tolist()) == {c: expected for c in range(NUM_CLASSES)}


def test_train_batches_shapes_dtypes(fake_imagenet):
    d = fake_imagenet["data_dir"]
    bs = batches("imagenet2012", "train", d, batch_size=5, train=True)
    assert len(bs) == 24 // 5  # drop remainder
    for b in bs:
        assert b["image"].shape == (5, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (5,) and b["label"].dtype == np.int32
        assert b["mask"].shape == (5,) and b["mask"].dtype == np.float32
        assert (b["mask"] == 1).all()
        assert set(b["label"].tolist()) <= set(range(NUM_CLASSES))
        raw = b["image"] * STD + MEAN  # undo Normalize: back in [0, 1]
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_default_process_is_jax_process(fake_imagenet):
    c = data_config(fake_imagenet["data_dir"], batch_size=8, eval_batch_size=8)
    (b,) = list(pipeline.make_eval_dataset(c).as_numpy_iterator())
    assert b["mask"].sum() == NUM_CLASSES * VAL_PER_CLASS
    assert sources.train_layout(c).steps_per_epoch == 3


def test_one_batch_at_224(fake_imagenet):
    c = data_config(fake_imagenet["data_dir"], batch_size=2, eval_batch_size=3, image_size=224,
                    resize_size=256)
    b = next(pipeline.make_train_dataset(c, process_index=0, process_count=1).as_numpy_iterator())
    assert b["image"].shape == (2, 224, 224, 3)
    bs = list(pipeline.make_eval_dataset(c, process_index=0, process_count=1).as_numpy_iterator())
    assert [b["image"].shape for b in bs] == [(3, 224, 224, 3)] * 3


def test_train_is_deterministic_and_epochs_differ(fake_imagenet):
    d = fake_imagenet["data_dir"]
    kw = dict(batch_size=4, train=True, seed=7)
    a = batches("imagenet2012", "train", d, epoch=0, **kw)
    b = batches("imagenet2012", "train", d, epoch=0, **kw)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = batches("imagenet2012", "train", d, epoch=1, **kw)
    assert not np.array_equal(stack(a, "label"), stack(c, "label"))
    e = batches("imagenet2012", "train", d, epoch=0, batch_size=4, train=True, seed=8)
    assert not np.array_equal(stack(a, "image"), stack(e, "image"))
    # iterating the same dataset object twice gives the same stream
    ds = pipeline.make_train_dataset(data_config(d, batch_size=4, seed=7), epoch=0,
                                     process_index=0, process_count=1)
    first = stack(list(ds.as_numpy_iterator()), "image")
    second = stack(list(ds.as_numpy_iterator()), "image")
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, stack(a, "image"))


def test_skip_batches_is_exact_resume(fake_imagenet):
    d = fake_imagenet["data_dir"]
    kw = dict(batch_size=3, train=True, seed=1, epoch=2)
    full = batches("imagenet2012", "train", d, **kw)
    for k in (1, 2):
        resumed = batches("imagenet2012", "train", d, skip_batches=k, **kw)
        assert len(resumed) == len(full) - k
        for x, y in zip(full[k:], resumed, strict=True):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("split,count", [("train", 2), ("validation", 3), ("train", 3)])
def test_process_shards_partition_the_split(fake_imagenet, split, count):
    """Eval mode (deterministic crops): the shards are disjoint and together the whole split."""
    d = fake_imagenet["data_dir"]
    whole = fingerprints(batches("imagenet2012", split, d, batch_size=4, train=False))
    assert len(set(whole)) == len(whole)
    per = [fingerprints(batches("imagenet2012", split, d, batch_size=2, train=False,
                                process_index=i, process_count=count))
           for i in range(count)]
    union = [f for p in per for f in p]
    assert len(union) == len(set(union)) == len(whole)
    assert set(union) == set(whole)


def test_train_shards_equal_sizes(fake_imagenet):
    d = fake_imagenet["data_dir"]
    # 24 examples, 5 processes: 4 each (remainder dropped), 2 batches of 2 on every process
    per = [batches("imagenet2012", "train", d, batch_size=2, train=True, process_index=i,
                   process_count=5) for i in range(5)]
    assert [len(p) for p in per] == [2] * 5



@pytest.mark.parametrize("epoch,skip", [(0, 0), (1, 1)])
def test_global_train_batches_depend_on_num_shards_not_on_the_process_count(fake_imagenet, epoch, skip):
    """num_shards=2: one process reading both shards yields, batch for batch, the concatenation
    of what two processes yield (the same crops and flips too), so a 2-process run trains on
    exactly the batches of a 1-process run."""
    d = fake_imagenet["data_dir"]
    kw = dict(train=True, seed=3, epoch=epoch, skip_batches=skip, data_shards=2)
    one = batches("imagenet2012", "train", d, batch_size=4, process_index=0, process_count=1, **kw)
    two = [batches("imagenet2012", "train", d, batch_size=2, process_index=i, process_count=2, **kw)
           for i in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 6 - skip
    for whole, a, b in zip(one, *two, strict=True):
        for key in ("image", "label"):
            np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]))
    assert sources.train_layout(data_config(d, batch_size=4, data_shards=2), 0, 1).steps_per_epoch == 6
    # shards are independent streams: the two halves of a batch are different examples and crops
    assert not np.array_equal(one[0]["image"][:2], one[0]["image"][2:])


def test_bad_num_shards_are_refused(fake_imagenet):
    d = fake_imagenet["data_dir"]
    with pytest.raises(ConfigError, match="data_shards=3 must be a positive multiple of the 2 processes"):
        sources.train_layout(data_config(d, batch_size=8, data_shards=3), 0, 2)
    with pytest.raises(ConfigError, match="data_shards=3 does not divide the global batch 8"):
        sources.train_layout(data_config(d, batch_size=8, data_shards=3), 0, 1)
    with pytest.raises(ConfigError, match="fewer than one batch of 64; lower --config.batch_size"):
        sources.train_layout(data_config(d, batch_size=64), 0, 1)


def test_eval_padding_counts_every_example_once(fake_imagenet):
    d = fake_imagenet["data_dir"]
    bs = batches("imagenet2012", "validation", d, batch_size=3, train=False)
    assert len(bs) == 3
    assert all(b["image"].shape == (3, 32, 32, 3) for b in bs)
    mask = stack(bs, "mask")
    assert mask.sum() == 8 and mask.tolist() == [1] * 8 + [0] * 1
    assert (bs[-1]["image"][-1] == 0).all() and bs[-1]["label"][-1] == 0
    # 3 processes: shards of 3, 3, 2 examples; all processes yield the same number of batches
    per = [batches("imagenet2012", "validation", d, batch_size=2, train=False, process_index=i,
                   process_count=3) for i in range(3)]
    assert [len(p) for p in per] == [2, 2, 2]
    assert sum(stack(p, "mask").sum() for p in per) == 8
    assert stack(per[2], "mask").tolist() == [1, 1, 0, 0]


def test_unprepared_dataset_error(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as e:
        pipeline.make_train_dataset(data_config(tmp_path, batch_size=2), process_index=0,
                                    process_count=1)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "tfds build imagenet2012 --manual_dir=" in msg and f"--data_dir={tmp_path}" in msg
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    with pytest.raises(DatasetNotPreparedError, match="tfds build mnist --data_dir="):
        sources.num_examples("mnist", "train", data_dir=tmp_path)
    assert not any(tmp_path.rglob("*.tfrecord*"))  # nothing was downloaded or built


def test_unknown_split_lists_available(fake_imagenet):
    with pytest.raises(ValueError, match="available splits are.*'train'.*'validation'"):
        pipeline.make_eval_dataset(data_config(fake_imagenet["data_dir"], eval_batch_size=2),
                                   "tset", process_index=0, process_count=1)


def test_ensure_fake_imagenet_once(tmp_path):
    assert fabricate.ensure_fake_imagenet(tmp_path, num_shards=2, num_classes=2,
                                          train_per_class=2, val_per_class=1) is True
    assert fabricate.ensure_fake_imagenet(tmp_path) is False
    assert sources.num_examples("imagenet2012", "train", tmp_path) == 4
    assert sources.num_examples("imagenet2012", "validation", tmp_path) == 2


# --- digits --------------------------------------------------------------------------------------

def test_digits_builder(digits_dir):
    import tensorflow_datasets as tfds

    builder = tfds.builder("sttn_digits", data_dir=digits_dir)
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.features["image"].shape == (32, 32, 3)
    n_train = sources.num_examples("sttn_digits", "train", digits_dir)
    n_test = sources.num_examples("sttn_digits", "test", digits_dir)
    assert (n_train, n_test) == (1442, 355)
    images, labels = digits.digits_arrays()
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert images.max() == 255 and (images[..., 0] == images[..., 2]).all()
    a, b = digits.split_indices(labels), digits.split_indices(labels)
    np.testing.assert_array_equal(a["test"], b["test"])
    assert not set(a["train"]) & set(a["test"])
    counts = np.bincount(labels[a["test"]], minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=10) // 5)  # stratified
    stored = list(tfds.as_numpy(builder.as_dataset(split="test")))
    assert collections.Counter(int(x["label"]) for x in stored) == collections.Counter(
        labels[a["test"]].tolist())


def test_digits_pipeline(digits_dir):
    bs = batches("sttn_digits", "test", digits_dir, batch_size=64, train=False, resize_size=32)
    assert len(bs) == 6 and stack(bs, "mask").sum() == 355
    assert bs[0]["image"].shape == (64, 32, 32, 3)
    tb = batches("sttn_digits", "train", digits_dir, batch_size=128, train=True, resize_size=32)
    assert len(tb) == 1442 // 128
    assert set(stack(tb, "label").tolist()) == set(range(10))


def test_digits_training_examples_carry_their_own_labels(digits_dir):
    """The training pipeline and transforms of configs/demo.py (32x32: the crop is the whole image,
    no flips) give every example exactly as one of the train split's source images, with that
    image's label, each image at most once an epoch. A label-mapping mistake in training (two
    classes' labels swapped, an off-by-one between label lists) fails here; the eval pipeline's
    checks do not see it."""
    from configs import demo

    c = demo.get_config()
    c.data_dir = digits_dir
    ds = pipeline.make_train_dataset(c, epoch=1)
    bs = list(pipeline.numpy_batches(ds))
    images, labels = digits.digits_arrays()
    train = digits.split_indices(labels)["train"]
    source = collections.defaultdict(set)  # pixels -> the source indices with them
    for i in train:
        source[images[i].tobytes()].add(int(i))
    pixels = np.round((stack(bs, "image") * STD + MEAN) * 255)  # undo Normalize
    assert np.abs(pixels - (stack(bs, "image") * STD + MEAN) * 255).max() < 1e-3
    seen = collections.Counter()
    for image, label in zip(pixels.astype(np.uint8), stack(bs, "label")):
        matches = source[image.tobytes()]
        assert matches, "a training example that is none of the source images"
        assert label in {int(labels[i]) for i in matches}, (label, sorted(matches))
        seen[image.tobytes()] += 1
    assert sum(seen.values()) == len(train) // c.batch_size * c.batch_size == 1408
    assert all(n <= len(source[key]) for key, n in seen.items())  # none twice in an epoch
    assert set(stack(bs, "label").tolist()) == set(range(10))


def test_digits_train_shards_partition(digits_dir):
    """Train mode, 2 processes: crop = whole image (resize_size = image_size), so each example
    is its image or its mirror; the two shards together are the train split."""
    def canon(bs):
        out = []
        for img in stack(bs, "image"):
            out.append(min(np.round(img, 4).tobytes(), np.round(img[:, ::-1], 4).tobytes()))
        return collections.Counter(hashlib.sha1(x).hexdigest() for x in out)

    kw = dict(batch_size=7, train=True, resize_size=32)
    per = [batches("sttn_digits", "train", digits_dir, process_index=i, process_count=2, **kw)
           for i in range(2)]
    assert len(per[0]) == len(per[1]) == 721 // 7
    whole = batches("sttn_digits", "train", digits_dir, batch_size=1, train=True, resize_size=32)
    assert canon(per[0]) + canon(per[1]) <= canon(whole)
    assert sum(canon(per[0]).values()) + sum(canon(per[1]).values()) == 2 * (721 // 7) * 7


def test_fast_input_mode_trains_on_the_same_crops(fake_imagenet):
    """config.input_mode=fast: the same examples, labels and crops, pixels within a few 255ths."""
    d = fake_imagenet["data_dir"]
    exact = batches("imagenet2012", "train", d, batch_size=4, train=True, seed=5)
    fast = batches("imagenet2012", "train", d, batch_size=4, train=True, seed=5, input_mode="fast")
    np.testing.assert_array_equal(stack(exact, "label"), stack(fast, "label"))
    diff = np.abs(stack(exact, "image") - stack(fast, "image")) * STD * 255
    # measured 4.0 / 17 on these noisy fabricated images; another crop of them differs by ~25
    assert diff.mean() < 6 and np.percentile(diff, 99) < 30, (diff.mean(), np.percentile(diff, 99))
    shifted = np.abs(stack(exact, "image")[:, :, 2:] - stack(fast, "image")[:, :, :-2]) * STD * 255
    assert shifted.mean() > 2 * diff.mean()
    with pytest.raises(ConfigError, match="input_mode='quick'"):
        sources.check(data_config(d, input_mode="quick"), split_keys=())

