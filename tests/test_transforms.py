"""sttn_jax.data.transforms against Pillow (what torchvision runs): exact mode equal to PIL in every
value (0 differing), libjpeg's cropped decoding equal to a full decode, fast mode within its
stated distance of exact, and the output contract. CPU only, eager TF and one tf.data check."""
import io
import types

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

from sttn_jax.data import resample, transforms as T  # noqa: E402

MEAN = np.array(T.IMAGENET_MEAN, np.float32)
STD = np.array(T.IMAGENET_STD, np.float32)

# fast mode vs exact, in 0..255 units, on smooth photo-like JPEGs: measured mean ~0.7, p99 ~4
FAST_MEAN_TOL, FAST_P99_TOL = 1.5, 8.0


def train_crop(seed, height, width, *, image_size: int = 224, resize_size: int | None = None,
               random_flip: bool = True):
    """The (top, left, flip) `preprocess_for_train` chooses for an image of (height, width)."""
    return T._geometry(seed, image_size, resize_size, random_flip)(height, width)[2:]


def resize_window(image, out_h, out_w, top, left, crop_h: int, crop_w: int, flip=False):
    """PIL's `Image.resize((out_w, out_h), BICUBIC)` cut to the crop_h x crop_w window at (top,
    left), mirrored if `flip`, through the transforms' own window resampling (uint8 HWC)."""
    shape = tf.shape(image)
    win = resample.Window(shape[0], shape[1], out_h, out_w, top, left, crop_h, crop_w, flip)
    return tf.cast(win.resample(win.region_of(image)), tf.uint8)


def harsh(rng, h, w):
    """Noise with saturated blocks: every negative lobe and both clips of PIL's passes used."""
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    blocks = rng.integers(0, 2, (-(-h // 3), -(-w // 3), 3), dtype=np.uint8) * 255
    mask = rng.random((h, w, 1)) < 0.5
    return np.where(mask, np.repeat(np.repeat(blocks, 3, 0), 3, 1)[:h, :w], a)


def smooth(rng, h, w, noise=6.0):
    """Low-frequency colour gradients plus mild noise: photo-like JPEG content."""
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    f, p = rng.uniform(0.5, 3.0, (2, 3)), rng.uniform(0, 2 * np.pi, (2, 3))
    img = (127.5 + 60 * np.sin(2 * np.pi * f[0] * x + p[0])
           + 60 * np.cos(2 * np.pi * f[1] * y + p[1]) + rng.normal(0, noise, (h, w, 3)))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(a, fmt="JPEG", **kw):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def pil_resized(encoded, resize_size):
    """torchvision Resize(resize_size, BICUBIC) on the PIL image."""
    im = Image.open(io.BytesIO(encoded)).convert("RGB")
    w, h = im.size
    nw, nh = (resize_size, int(resize_size * h / w)) if w <= h else (int(resize_size * w / h),
                                                                      resize_size)
    return im.resize((nw, nh), Image.BICUBIC)


def pil_train(encoded, top, left, flip, size=224, resize_size=256):
    """Resize + RandomCrop at (top, left) + RandomHorizontalFlip as torchvision: uint8 HWC."""
    im = pil_resized(encoded, resize_size).crop((left, top, left + size, top + size))
    return np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im)


def pil_eval(encoded, size=224, resize_size=256):
    im = pil_resized(encoded, resize_size)
    top, left = int(round((im.height - size) / 2)), int(round((im.width - size) / 2))
    return np.asarray(im.crop((left, top, left + size, top + size)))


def as_uint8(out):
    """normalize=None output (x / 255) back to the uint8 values."""
    return np.round(np.asarray(out) * 255).astype(np.int64)


# --- the resize itself -----------------------------------------------------------------------

RESIZE_CASES = [  # (in_h, in_w, out_h, out_w)
    (375, 500, 256, 341), (500, 375, 341, 256),  # the shorter-side resize of 500x375 photos
    (900, 1200, 256, 341), (1200, 900, 341, 256),  # large downscale
    (7, 5, 300, 214), (5, 7, 9, 13), (1, 1, 3, 3),  # tiny, upscaled
    (256, 300, 256, 200), (300, 256, 200, 256),  # one side unchanged: its pass is skipped
    (120, 60, 50, 55), (700, 300, 597, 256), (97, 41, 20, 39),  # Pillow 13 runs vertical first
    (60, 60, 4, 32), (60, 60, 4, 33),  # either side of that rule's boundary
    (333, 517, 211, 301), (41, 203, 77, 64), (150, 200, 256, 341),  # odd, mixed, upscale
]


def test_resize_window_equals_pil():
    rng = np.random.default_rng(0)
    differing, orders = 0, set()
    for in_h, in_w, out_h, out_w in RESIZE_CASES:
        a = harsh(rng, in_h, in_w)
        ref = np.asarray(Image.fromarray(a).resize((out_w, out_h), Image.BICUBIC))
        for _ in range(2):
            ch, cw = int(rng.integers(1, out_h + 1)), int(rng.integers(1, out_w + 1))
            top, left = int(rng.integers(0, out_h - ch + 1)), int(rng.integers(0, out_w - cw + 1))
            flip = bool(rng.integers(0, 2))
            got = resize_window(tf.constant(a), out_h, out_w, top, left, ch, cw, flip).numpy()
            want = ref[top:top + ch, left:left + cw]
            want = want[:, ::-1] if flip else want
            assert got.shape == want.shape and got.dtype == np.uint8
            differing += int((got != want).sum())
        orders.add(bool(resample.vertical_first(in_h, in_w, out_h, out_w)))
    assert differing == 0
    assert orders == {True, False}  # both of Pillow's orders of passes were checked


# --- the transforms, from encoded bytes and from decoded images -------------------------------

TRANSFORM_CASES = [  # (h, w, JPEG save options)
    (375, 500, {}), (500, 375, {}), (900, 1200, {}),
    (375, 503, {}),  # -> 256x343: centre crop left = round(59.5) = 60 (58.5 -> 58 above)
    (150, 200, {}),  # smaller than the crop: upsampled
    (700, 300, {}),  # tall: Pillow 13 resizes vertically first
    (256, 300, {"subsampling": 0}),  # shorter side already 256 (4:4:4 chroma)
    (333, 517, {"quality": 75, "subsampling": 1}),  # odd sizes (4:2:2 chroma)
]


@pytest.fixture(scope="module")
def jpegs():
    rng = np.random.default_rng(1)
    out = [encode(harsh(rng, h, w) if i % 2 else smooth(rng, h, w), **{"quality": 90, **kw})
           for i, (h, w, kw) in enumerate(TRANSFORM_CASES)]
    out.append(encode(smooth(rng, 300, 410)[..., 0], quality=90))  # greyscale JPEG
    out.append(encode(smooth(rng, 210, 330), "PNG"))  # not a JPEG: decoded whole
    return out


def test_train_equals_torchvision_on_pil(jpegs):
    differing, flips = 0, set()
    for k, encoded in enumerate(jpegs):
        image = T.decode(tf.constant(encoded))
        h, w = image.shape[:2]
        for s in range(3):
            seed = tf.constant([k, s], tf.int64)
            top, left, flip = (v.numpy() for v in train_crop(seed, h, w))
            want = pil_train(encoded, top, left, flip)
            flips.add(bool(flip))
            for got in (T.preprocess_encoded_for_train(tf.constant(encoded), seed, normalize=None),
                        T.preprocess_for_train(image, seed, normalize=None)):
                differing += int((as_uint8(got) != want).sum())
    assert differing == 0
    assert flips == {True, False}


def test_eval_equals_torchvision_on_pil(jpegs):
    differing = 0
    for encoded in jpegs:
        want = pil_eval(encoded)  # Python's round: half to even
        for got in (T.preprocess_encoded_for_eval(tf.constant(encoded), normalize=None),
                    T.preprocess_for_eval(T.decode(tf.constant(encoded)), normalize=None)):
            differing += int((as_uint8(got) != want).sum())
    assert differing == 0


def test_small_image_size_equals_pil():
    """image_size=32 (resize 37), as the digits demo uses."""
    rng = np.random.default_rng(2)
    differing = 0
    for h, w in [(28, 28), (40, 33), (100, 64)]:
        encoded = encode(harsh(rng, h, w), quality=95)
        seed = tf.constant([5, h], tf.int64)
        top, left, flip = (v.numpy() for v in train_crop(seed, h, w, image_size=32))
        got = T.preprocess_encoded_for_train(tf.constant(encoded), seed, image_size=32,
                                             normalize=None)
        differing += int((as_uint8(got) != pil_train(encoded, top, left, flip, 32, 37)).sum())
        got = T.preprocess_encoded_for_eval(tf.constant(encoded), image_size=32, normalize=None)
        differing += int((as_uint8(got) != pil_eval(encoded, 32, 37)).sum())
    assert differing == 0


def test_cropped_jpeg_decode_equals_full_decode():
    """libjpeg's cropped decoding, widened by a column each side as the exact mode does it,
    gives the full decode's pixels: 4:4:4, 4:2:2, 4:2:0, progressive, windows at odd offsets.
    (The full decode is PIL's.)"""
    rng = np.random.default_rng(3)
    differing = 0
    for i in range(24):
        h, w = (int(v) for v in rng.integers(8, 300, 2))
        progressive = i % 4 == 0  # (smooth: PIL's progressive encoder wants a small file)
        encoded = encode(smooth(rng, h, w, 30) if progressive else harsh(rng, h, w),
                         quality=int(rng.integers(50, 100)), subsampling=i % 3,
                         progressive=progressive)
        full = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE").numpy()
        assert (full == np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))).all()
        for _ in range(6):
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            nh, nw = int(rng.integers(1, h - y0 + 1)), int(rng.integers(1, w - x0 + 1))
            win = types.SimpleNamespace(row0=y0, col0=x0, num_rows=nh, num_cols=nw)
            got = T._decode_jpeg_region(tf.constant(encoded), win, w).numpy()
            differing += int((got != full[y0:y0 + nh, x0:x0 + nw]).sum())
    assert differing == 0


# --- fast mode ---------------------------------------------------------------------------------


def test_fast_mode_close_to_exact():
    """Mean and 99th percentile of |fast - exact| in 0..255 units, train (flips included) and
    eval, on 500x375 / 375x500 photo-like JPEGs and a 1200x900 one (DCT-domain downscaling by 2).
    A wrong flip or crop offset is far outside these (tens of units on these gradients)."""
    rng = np.random.default_rng(4)
    sizes = [(375, 500), (500, 375)] * 3 + [(900, 1200)]
    diffs, flips = [], set()
    for k, (h, w) in enumerate(sizes):
        encoded = tf.constant(encode(smooth(rng, h, w), quality=90))
        for s in range(3):
            seed = tf.constant([9, 3 * k + s], tf.int64)
            flips.add(bool(train_crop(seed, h, w)[2]))
            exact = T.preprocess_encoded_for_train(encoded, seed, normalize=None)
            fast = T.preprocess_encoded_for_train(encoded, seed, normalize=None, mode="fast")
            diffs.append(np.abs(np.asarray(fast) - np.asarray(exact)) * 255)
        exact = T.preprocess_encoded_for_eval(encoded, normalize=None)
        fast = T.preprocess_for_eval(T.decode(encoded), normalize=None, mode="fast")
        diffs.append(np.abs(np.asarray(fast) - np.asarray(exact)) * 255)
    d = np.stack(diffs)
    assert flips == {True, False}
    assert d.mean() < FAST_MEAN_TOL and np.percentile(d, 99) < FAST_P99_TOL, (
        d.mean(), np.percentile(d, 99))


# --- the output contract -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", T.MODES)
def test_output_shape_dtype_and_normalisation(mode):
    rng = np.random.default_rng(5)
    encoded = encode(smooth(rng, 375, 500))
    seed = tf.constant([1, 2], tf.int64)
    raw = T.preprocess_encoded_for_train(tf.constant(encoded), seed, normalize=None, mode=mode)
    norm = T.preprocess_encoded_for_train(tf.constant(encoded), seed, mode=mode)
    assert raw.shape == norm.shape == (224, 224, 3) and norm.dtype == tf.float32
    raw, norm = np.asarray(raw), np.asarray(norm)
    assert 0.0 <= raw.min() and raw.max() <= 1.0
    np.testing.assert_allclose(norm, (raw - MEAN) / STD, rtol=1e-6, atol=1e-6)
    pair = T.preprocess_encoded_for_eval(tf.constant(encoded), normalize=((0.5,) * 3, (0.25,) * 3),
                                         mode=mode, image_size=64)
    raw = T.preprocess_encoded_for_eval(tf.constant(encoded), normalize="none", mode=mode,
                                        image_size=64)
    assert pair.shape == (64, 64, 3)
    np.testing.assert_allclose(pair, (np.asarray(raw) - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_exact_normalisation_values():
    """Every uint8 value v maps to (v / 255 - mean) / std (float32, within 1e-6)."""
    v = np.arange(256 * 3, dtype=np.uint8).reshape(16, 16, 3)
    v[0, 0], v[-1, -1] = 0, 255
    out = T._to_output(tf.constant(v), "imagenet").numpy()
    np.testing.assert_allclose(out, (v / np.float32(255) - MEAN) / STD, rtol=1e-6, atol=1e-6)


def test_no_flip_and_crop_ranges():
    """random_flip=False never flips; crops cover [0, side - crop] for both axes; the choices
    are a pure function of the seed."""
    tops, lefts = set(), set()
    for s in range(200):
        seed = tf.constant([3, s], tf.int64)
        top, left, flip = (int(v) for v in train_crop(seed, 260, 300, random_flip=False))
        assert not flip
        tops.add(top)
        lefts.add(left)
    assert min(tops) == 0 and max(tops) == 32 and min(lefts) == 0 and max(lefts) == 71  # 256x295
    seed = tf.constant([7, 7], tf.int64)
    assert [int(v) for v in train_crop(seed, 375, 500)] == [int(v) for v in train_crop(
        seed, 375, 500)]


def test_bad_arguments():
    image = tf.zeros((300, 300, 3), tf.uint8)
    with pytest.raises(ValueError, match="mode"):
        T.preprocess_for_eval(image, mode="quick")
    with pytest.raises(ValueError, match="normalize"):
        T.preprocess_for_eval(image, normalize="cifar")
    with pytest.raises(ValueError, match="resize_size"):
        T.preprocess_for_train(image, tf.constant([0, 0], tf.int64), resize_size=200)


def test_inside_tf_data(jpegs):
    """Graph mode with dynamic shapes (tf.data.Dataset.map): the same values as eagerly."""
    def fn(i, encoded):
        seed = tf.stack([tf.constant(4, tf.int64), i])
        return (T.preprocess_encoded_for_train(encoded, seed),
                T.preprocess_encoded_for_train(encoded, seed, mode="fast"),
                T.preprocess_encoded_for_eval(encoded))

    ds = tf.data.Dataset.from_tensor_slices(jpegs[:4]).enumerate().map(fn)
    for i, (exact, fast, ev) in enumerate(ds):
        seed = tf.constant([4, i], tf.int64)
        encoded = tf.constant(jpegs[i])
        np.testing.assert_array_equal(exact, T.preprocess_encoded_for_train(encoded, seed))
        np.testing.assert_array_equal(
            fast, T.preprocess_encoded_for_train(encoded, seed, mode="fast"))
        np.testing.assert_array_equal(ev, T.preprocess_encoded_for_eval(encoded))


# --- the input benchmark -----------------------------------------------------------------------


def _input_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "input_bench.py"
    spec = importlib.util.spec_from_file_location("input_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_input_bench_runs():
    """benchmarks/input_bench.py: its JPEGs (about 46 KB, both orientations) and a tiny run of
    every pipeline in its single-threaded subprocess."""
    bench = _input_bench()
    jpegs = bench.make_jpegs(8)
    assert 40 < np.mean([len(j) for j in jpegs]) / 1000 < 52
    assert {Image.open(io.BytesIO(j)).size for j in jpegs} == {(500, 375), (375, 500)}
    result = bench.measure(num_images=2, seconds=0.0)
    assert set(bench.KEYS) <= set(result) and all(result[k] > 0 for k in bench.KEYS)
