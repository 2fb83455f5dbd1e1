"""Input pipeline tests: a fabricated ILSVRC2012 prepared by the real TFDS imagenet2012 builder,
the embedded digits builder, transforms against PIL (what torchvision runs), determinism,
resume, per-process sharding and eval padding. CPU only, about half a minute."""
import collections
import hashlib
import io

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from sttn_jax.data import digits, fabricate, pipeline  # noqa: E402

MEAN = np.array(pipeline.IMAGENET_MEAN, np.float32)
STD = np.array(pipeline.IMAGENET_STD, np.float32)
NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 6, 2


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_imagenet")
    info = fabricate.fabricate_imagenet(root / "manual", num_classes=NUM_CLASSES,
                                        train_per_class=TRAIN_PER_CLASS,
                                        val_per_class=VAL_PER_CLASS)
    seconds = fabricate.prepare_imagenet(root / "data", root / "manual", num_shards=3)
    assert seconds < 60, f"preparing the fake ImageNet took {seconds:.1f} s"
    info["data_dir"] = str(root / "data")
    return info


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("digits")
    assert digits.ensure_digits(data_dir) is True
    assert digits.ensure_digits(data_dir) is False  # second call: already there
    return str(data_dir)


def batches(name, split, data_dir, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return list(pipeline.as_numpy(pipeline.make_dataset(name, split, data_dir=data_dir, **kw)))


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


# --- the fabricated ImageNet, through the real builder ------------------------------------------

def test_fabricated_counts_and_synsets(fake_imagenet):
    d = fake_imagenet["data_dir"]
    assert pipeline.num_examples("imagenet2012", "train", d) == NUM_CLASSES * TRAIN_PER_CLASS
    assert pipeline.num_examples("imagenet2012", "validation", d) == NUM_CLASSES * VAL_PER_CLASS
    assert fake_imagenet["synsets"] == fabricate.imagenet_synsets()[:NUM_CLASSES]
    assert fake_imagenet["synsets"][0] == "n01440764"
    assert pipeline.steps_per_epoch("imagenet2012", "train", 8, d, process_count=1) == 3
    assert pipeline.steps_per_epoch("imagenet2012", "train", 8, d, process_count=2) == 3
    # eval: 8 examples, 2 processes of 3 -> shards of 4 -> 2 batches each (one padded)
    assert pipeline.steps_per_epoch("imagenet2012", "validation", 6, d, train=False,
                                    process_count=2) == 2


@pytest.mark.parametrize("split", ["train", "validation"])
def test_labels_match_image_content(fake_imagenet, split):
    """Every image is in its label's colour: validation labels line up with the fabricated images
    (the builder assigns them by position in the sorted val tar)."""
    bs = batches("imagenet2012", split, fake_imagenet["data_dir"], batch_size=4, train=False,
                 image_size=32, normalize=None)
    labels = stack(bs, "label")[stack(bs, "mask") > 0]
    colours = stack(bs, "image")[stack(bs, "mask") > 0].mean(axis=(1, 2)) * 255
    palette = np.stack([fabricate._class_colour(c, NUM_CLASSES) * 0.75
                        for c in range(NUM_CLASSES)])
    nearest = np.argmin(((colours[:, None] - palette[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, labels)
    expected = TRAIN_PER_CLASS if split == "train" else VAL_PER_CLASS
    assert collections.Counter(labels.tolist()) == {c: expected for c in range(NUM_CLASSES)}


def test_train_batches_shapes_dtypes(fake_imagenet):
    d = fake_imagenet["data_dir"]
    bs = batches("imagenet2012", "train", d, batch_size=5, train=True, image_size=32)
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
    ds = pipeline.make_dataset("imagenet2012", "validation", batch_size=8, train=False,
                               image_size=32, data_dir=fake_imagenet["data_dir"])
    (b,) = list(pipeline.as_numpy(ds))
    assert b["mask"].sum() == NUM_CLASSES * VAL_PER_CLASS
    assert pipeline.steps_per_epoch("imagenet2012", "train", 8, fake_imagenet["data_dir"]) == 3


def test_one_batch_at_224(fake_imagenet):
    ds = pipeline.make_dataset("imagenet2012", "train", batch_size=2, train=True,
                               data_dir=fake_imagenet["data_dir"], process_index=0,
                               process_count=1)
    b = next(iter(pipeline.as_numpy(ds.take(1))))
    assert b["image"].shape == (2, 224, 224, 3)
    ds = pipeline.make_dataset("imagenet2012", "validation", batch_size=3, train=False,
                               data_dir=fake_imagenet["data_dir"], process_index=0,
                               process_count=1)
    bs = list(pipeline.as_numpy(ds))
    assert [b["image"].shape for b in bs] == [(3, 224, 224, 3)] * 3


def test_normalisation_matches_raw(fake_imagenet):
    d = fake_imagenet["data_dir"]
    kw = dict(batch_size=4, train=True, image_size=32, seed=3, epoch=1)
    norm = stack(batches("imagenet2012", "train", d, **kw), "image")
    raw = stack(batches("imagenet2012", "train", d, normalize="none", **kw), "image")
    np.testing.assert_allclose(norm, (raw - MEAN) / STD, rtol=1e-5, atol=1e-5)
    assert raw.min() >= 0 and raw.max() <= 1


def test_train_is_deterministic_and_epochs_differ(fake_imagenet):
    d = fake_imagenet["data_dir"]
    kw = dict(batch_size=4, train=True, image_size=32, seed=7)
    a = batches("imagenet2012", "train", d, epoch=0, **kw)
    b = batches("imagenet2012", "train", d, epoch=0, **kw)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = batches("imagenet2012", "train", d, epoch=1, **kw)
    assert not np.array_equal(stack(a, "label"), stack(c, "label"))
    e = batches("imagenet2012", "train", d, epoch=0, batch_size=4, train=True, image_size=32,
                seed=8)
    assert not np.array_equal(stack(a, "image"), stack(e, "image"))
    # iterating the same dataset object twice gives the same stream
    ds = pipeline.make_dataset("imagenet2012", "train", data_dir=d, epoch=0, process_index=0,
                               process_count=1, **kw)
    first = stack(list(pipeline.as_numpy(ds)), "image")
    second = stack(list(pipeline.as_numpy(ds)), "image")
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, stack(a, "image"))


@pytest.mark.parametrize("train,split", [(True, "train"), (False, "validation")])
def test_skip_batches_is_exact_resume(fake_imagenet, train, split):
    d = fake_imagenet["data_dir"]
    kw = dict(batch_size=3, train=train, image_size=32, seed=1, epoch=2)
    full = batches("imagenet2012", split, d, **kw)
    for k in (1, 2):
        resumed = batches("imagenet2012", split, d, skip_batches=k, **kw)
        assert len(resumed) == len(full) - k
        for x, y in zip(full[k:], resumed, strict=True):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("split,count", [("train", 2), ("validation", 3), ("train", 3)])
def test_process_shards_partition_the_split(fake_imagenet, split, count):
    """Eval mode (deterministic crops): the shards are disjoint and together the whole split."""
    d = fake_imagenet["data_dir"]
    whole = fingerprints(batches("imagenet2012", split, d, batch_size=4, train=False,
                                 image_size=32))
    assert len(set(whole)) == len(whole)
    per = [fingerprints(batches("imagenet2012", split, d, batch_size=2, train=False,
                                image_size=32, process_index=i, process_count=count))
           for i in range(count)]
    union = [f for p in per for f in p]
    assert len(union) == len(set(union)) == len(whole)
    assert set(union) == set(whole)


def test_train_shards_equal_sizes(fake_imagenet):
    d = fake_imagenet["data_dir"]
    # 24 examples, 5 processes: 4 each (remainder dropped), 2 batches of 2 on every process
    per = [batches("imagenet2012", "train", d, batch_size=2, train=True, image_size=32,
                   process_index=i, process_count=5) for i in range(5)]
    assert [len(p) for p in per] == [2] * 5



@pytest.mark.parametrize("epoch,skip", [(0, 0), (1, 1)])
def test_global_train_batches_depend_on_num_shards_not_on_the_process_count(fake_imagenet, epoch, skip):
    """num_shards=2: one process reading both shards yields, batch for batch, the concatenation
    of what two processes yield (the same crops and flips too), so a 2-process run trains on
    exactly the batches of a 1-process run."""
    d = fake_imagenet["data_dir"]
    kw = dict(train=True, image_size=32, seed=3, epoch=epoch, skip_batches=skip, num_shards=2)
    one = batches("imagenet2012", "train", d, batch_size=4, process_index=0, process_count=1, **kw)
    two = [batches("imagenet2012", "train", d, batch_size=2, process_index=i, process_count=2, **kw)
           for i in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 6 - skip
    for whole, a, b in zip(one, *two, strict=True):
        for key in ("image", "label"):
            np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]))
    assert pipeline.steps_per_epoch("imagenet2012", "train", 4, d, process_count=1, num_shards=2) == 6
    # shards are independent streams: the two halves of a batch are different examples and crops
    assert not np.array_equal(one[0]["image"][:2], one[0]["image"][2:])


def test_bad_num_shards_are_refused(fake_imagenet):
    d = fake_imagenet["data_dir"]
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        pipeline.steps_per_epoch("imagenet2012", "train", 8, d, process_count=2, num_shards=3)
    with pytest.raises(ValueError, match="not divisible by num_shards=3"):
        pipeline.steps_per_epoch("imagenet2012", "train", 8, d, process_count=1, num_shards=3)

def test_eval_padding_counts_every_example_once(fake_imagenet):
    d = fake_imagenet["data_dir"]
    bs = batches("imagenet2012", "validation", d, batch_size=3, train=False, image_size=32)
    assert len(bs) == 3
    assert all(b["image"].shape == (3, 32, 32, 3) for b in bs)
    mask = stack(bs, "mask")
    assert mask.sum() == 8 and mask.tolist() == [1] * 8 + [0] * 1
    assert (bs[-1]["image"][-1] == 0).all() and bs[-1]["label"][-1] == 0
    # 3 processes: shards of 3, 3, 2 examples; all processes yield the same number of batches
    per = [batches("imagenet2012", "validation", d, batch_size=2, train=False, image_size=32,
                   process_index=i, process_count=3) for i in range(3)]
    assert [len(p) for p in per] == [2, 2, 2]
    assert sum(stack(p, "mask").sum() for p in per) == 8
    assert stack(per[2], "mask").tolist() == [1, 1, 0, 0]


def test_unprepared_dataset_error(tmp_path):
    with pytest.raises(pipeline.DatasetNotPreparedError) as e:
        pipeline.make_dataset("imagenet2012", "train", batch_size=2, train=True,
                              data_dir=tmp_path, process_index=0, process_count=1)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "tfds build imagenet2012 --manual_dir=" in msg and f"--data_dir={tmp_path}" in msg
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    with pytest.raises(pipeline.DatasetNotPreparedError, match="tfds build mnist --data_dir="):
        pipeline.num_examples("mnist", "train", data_dir=tmp_path)
    assert not any(tmp_path.rglob("*.tfrecord*"))  # nothing was downloaded or built


def test_unknown_split_lists_available(fake_imagenet):
    with pytest.raises(ValueError, match="available splits are.*'train'.*'validation'"):
        pipeline.make_dataset("imagenet2012", "tset", batch_size=2, train=False,
                              data_dir=fake_imagenet["data_dir"], process_index=0,
                              process_count=1)


def test_ensure_fake_imagenet_once(tmp_path):
    assert fabricate.ensure_fake_imagenet(tmp_path, num_shards=2, num_classes=2,
                                          train_per_class=2, val_per_class=1) is True
    assert fabricate.ensure_fake_imagenet(tmp_path) is False
    assert pipeline.num_examples("imagenet2012", "train", tmp_path) == 4
    assert pipeline.num_examples("imagenet2012", "validation", tmp_path) == 2


# --- transforms ----------------------------------------------------------------------------------

def test_constant_image_normalisation():
    tf = pipeline._tf()
    for v in (0, 37, 128, 255):
        img = tf.fill((40, 56, 3), tf.constant(v, tf.uint8))
        out = pipeline.preprocess_for_eval(img, image_size=32).numpy()
        np.testing.assert_allclose(out, np.broadcast_to((v / 255 - MEAN) / STD, out.shape),
                                   rtol=1e-6, atol=1e-6)
        out = pipeline.preprocess_for_train(img, tf.constant([1, 2], tf.int64),
                                            image_size=32).numpy()
        np.testing.assert_allclose(out, np.broadcast_to((v / 255 - MEAN) / STD, out.shape),
                                   rtol=1e-6, atol=1e-6)


def _pil_eval(jpeg: bytes, size: int, crop: int) -> np.ndarray:
    """torchvision's Resize(size, BICUBIC) + CenterCrop(crop) + ToTensor on a PIL image."""
    from PIL import Image

    im = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = im.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nh, nw = size, int(size * w / h)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return np.asarray(im, np.float32)[top:top + crop, left:left + crop] / 255.0


@pytest.mark.parametrize("hw,size,crop", [((375, 500), 256, 224), ((300, 256), 256, 224),
                                          ((40, 56), 37, 32), ((8, 8), 37, 32)])
def test_eval_transform_matches_pil(hw, size, crop):
    from PIL import Image

    tf = pipeline._tf()
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(hw[0] // 4 + 2, hw[1] // 4 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize(hw[::-1], Image.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    ref = _pil_eval(jpeg, size, crop)
    decoded = tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE")
    ours = pipeline.preprocess_for_eval(decoded, image_size=crop, resize_size=size,
                                        normalize=None).numpy()
    assert ours.shape == ref.shape == (crop, crop, 3)
    diff = np.abs(ours - ref) * 255
    assert diff.max() <= 1.0 + 1e-4
    assert (diff > 0.5).mean() < 1e-3  # PIL's fixed-point weights: ~1 value in 8,000 off by one


def test_train_crop_flip_cover_the_resized_image():
    """Random crops land anywhere in the resized image and both flips occur."""
    tf = pipeline._tf()
    img = tf.constant(np.arange(37 * 51 * 3).reshape(37, 51, 3) % 251, tf.uint8)
    outs = {pipeline.preprocess_for_train(img, tf.constant([0, i], tf.int64), image_size=32,
                                          resize_size=37, normalize=None).numpy().tobytes()
            for i in range(40)}
    assert len(outs) > 20


# --- digits --------------------------------------------------------------------------------------

def test_digits_builder(digits_dir):
    import tensorflow_datasets as tfds

    builder = tfds.builder("sttn_digits", data_dir=digits_dir)
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.features["image"].shape == (32, 32, 3)
    n_train = pipeline.num_examples("sttn_digits", "train", digits_dir)
    n_test = pipeline.num_examples("sttn_digits", "test", digits_dir)
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
    bs = batches("sttn_digits", "test", digits_dir, batch_size=64, train=False, image_size=32)
    assert len(bs) == 6 and stack(bs, "mask").sum() == 355
    assert bs[0]["image"].shape == (64, 32, 32, 3)
    tb = batches("sttn_digits", "train", digits_dir, batch_size=128, train=True, image_size=32)
    assert len(tb) == 1442 // 128
    assert set(stack(tb, "label").tolist()) == set(range(10))


def test_digits_train_shards_partition(digits_dir):
    """Train mode, 2 processes: crop = whole image (resize_size = image_size), so each example
    is its image or its mirror; the two shards together are the train split."""
    def canon(bs):
        out = []
        for img in stack(bs, "image"):
            out.append(min(np.round(img, 4).tobytes(), np.round(img[:, ::-1], 4).tobytes()))
        return collections.Counter(hashlib.sha1(x).hexdigest() for x in out)

    kw = dict(batch_size=7, train=True, image_size=32, resize_size=32)
    per = [batches("sttn_digits", "train", digits_dir, process_index=i, process_count=2, **kw)
           for i in range(2)]
    assert len(per[0]) == len(per[1]) == 721 // 7
    whole = batches("sttn_digits", "train", digits_dir, batch_size=1, train=True,
                    image_size=32, resize_size=32)
    assert canon(per[0]) + canon(per[1]) <= canon(whole)
    assert sum(canon(per[0]).values()) + sum(canon(per[1]).values()) == 2 * (721 // 7) * 7
