"""Per-image transforms for tf.data: the original's torchvision transforms on PIL images.

  train: Resize(resize_size, BICUBIC) of the shorter side, RandomCrop(image_size),
         RandomHorizontalFlip(0.5), ToTensor, Normalize(ImageNet mean/std)
  eval:  the same Resize, CenterCrop(image_size), ToTensor, Normalize

mode="exact" (default): PIL's pixels bit for bit, resampling (`resample`) and decoding (JPEG) only
what the crop window reads. mode="fast": the source box under the window decoded (at half
resolution where it suffices) and box-filtered: pixels a few 255ths from exact, same crop and flip.
"""

import numpy as np

from sttn_jax.data import resample
from sttn_jax.data.tf_import import tf as _tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("exact", "fast")
_DCT = "INTEGER_ACCURATE"  # libjpeg's default IDCT, PIL's: bit-identical pixels


def _to_output(image, normalize):
    """HWC 0..255 -> float32 ToTensor() and Normalize ("imagenet", None/"none" or (mean, std)) as
    one multiply-add (within 2 float32 ulps), on the (H, W*3) view, which TF broadcasts faster."""
    tf = _tf()
    if normalize is None or (isinstance(normalize, str) and normalize.lower() == "none"):
        mean, std = 0.0, 1.0
    elif isinstance(normalize, str):
        if normalize.lower() != "imagenet":
            raise ValueError(f"normalize must be 'imagenet', None or 'none', got {normalize!r}")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = map(tuple, normalize)
    mean, std = (np.broadcast_to(np.asarray(v, np.float64), (3,)) for v in (mean, std))
    scale, offset = (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)
    shape = tf.shape(image)
    x = tf.reshape(tf.cast(image, tf.float32), [shape[0], -1])
    x = x * tf.tile(scale, [shape[1]]) + tf.tile(offset, [shape[1]])
    return tf.reshape(x, shape)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def resized_shape(height, width, size: int):
    """torchvision Resize(size): shorter side -> size, longer side -> int(size * long / short)."""
    tf = _tf()
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    s = tf.constant(float(size), tf.float64)
    new_h = tf.where(h <= w, s, tf.floor(s * h / w))
    new_w = tf.where(h <= w, tf.floor(s * w / h), s)
    return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def _geometry(seed, image_size: int, resize_size: int | None, random_flip: bool = False):
    """(height, width) -> (resized h, resized w, top, left, flip) as torchvision computes them:
    RandomCrop and flip from a stateless `seed`, or (None) CenterCrop rounding half to even."""
    tf = _tf()
    size = resize_size or int(round(image_size * 256 / 224))
    if size < image_size:
        raise ValueError(f"resize_size {size} is smaller than image_size {image_size}")

    def geometry(height, width):
        new_h, new_w = resized_shape(height, width, size)
        if seed is None:
            top, left = (tf.cast(tf.round(tf.cast(side - image_size, tf.float64) / 2.0), tf.int32)
                         for side in (new_h, new_w))
            return new_h, new_w, top, left, tf.constant(False)
        seeds = tf.random.experimental.stateless_split(seed, num=3)
        top = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=new_h - image_size + 1,
                                          dtype=tf.int32)
        left = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=new_w - image_size + 1,
                                           dtype=tf.int32)
        flip = tf.random.stateless_uniform([], seeds[2]) < (0.5 if random_flip else 0.0)
        return new_h, new_w, top, left, flip

    return geometry


def _decode_jpeg_region(encoded, win, width):
    """The source region a window reads, decoding only it, widened by one column each side and cut
    back: chroma upsampling treats a cropped decode's edges as image edges."""
    tf = _tf()
    col0 = tf.maximum(win.col0 - 1, 0)
    col1 = tf.minimum(win.col0 + win.num_cols + 1, width)
    box = tf.stack([win.row0, col0, win.num_rows, col1 - col0])
    region = tf.io.decode_and_crop_jpeg(encoded, box, channels=3, dct_method=_DCT)
    return region[:, win.col0 - col0:win.col0 - col0 + win.num_cols]


def _source_box(in_h, in_w, out_h, out_w, top, left, size: int):
    """Fast mode: (y0, x0, height, width) of the source pixels under an output window, rounded."""
    tf = _tf()

    def span(start, in_size, out_size):
        scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
        lo = tf.cast(tf.round(tf.cast(start, tf.float32) * scale), tf.int32)
        hi = tf.cast(tf.round(tf.cast(start + size, tf.float32) * scale), tf.int32)
        lo = tf.clip_by_value(lo, 0, in_size - 1)
        return lo, tf.clip_by_value(hi, lo + 1, in_size) - lo

    (y0, h), (x0, w) = span(top, in_h, out_h), span(left, in_w, out_w)
    return y0, x0, h, w


def _fast_resize(box, flip, size: int):
    """The source box -> (size, size, 3) float32 0..255, mirrored if `flip` (antialiased)."""
    tf = _tf()
    out = tf.image.resize(box, [size, size], method="area")
    return tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)


def decode(encoded):
    """The whole image, HWC uint8 RGB, as PIL decodes it (JPEG: accurate integer DCT)."""
    tf = _tf()
    return tf.cond(tf.io.is_jpeg(encoded),
                   lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=_DCT),
                   lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


def _finish(window, image_size, normalize):
    """The static shape, then ToTensor and Normalize."""
    return _to_output(_tf().ensure_shape(window, (image_size, image_size, 3)), normalize)


def _from_image(image, geometry, image_size, normalize, mode):
    """The transform of a decoded uint8 HWC image, `geometry` giving its size and crop."""
    tf = _tf()
    _check_mode(mode)
    shape = tf.shape(image)
    new_h, new_w, top, left, flip = geometry(shape[0], shape[1])
    if mode == "fast":
        y0, x0, h, w = _source_box(shape[0], shape[1], new_h, new_w, top, left, image_size)
        window = _fast_resize(image[y0:y0 + h, x0:x0 + w], flip, image_size)
    else:
        win = resample.Window(shape[0], shape[1], new_h, new_w, top, left, image_size,
                              image_size, flip)
        window = win.resample(win.region_of(image))
    return _finish(window, image_size, normalize)


def _from_encoded(encoded, geometry, image_size, normalize, mode):
    """Decodes only what the window reads of a JPEG, other formats whole; the tf.conds hold only
    decoding (ops in a cond run slower in tf.data)."""
    tf = _tf()
    _check_mode(mode)
    is_jpeg = tf.io.is_jpeg(encoded)

    def decode_whole():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return image, tf.shape(image)

    whole, shape = tf.cond(  # a JPEG is not decoded here: an empty placeholder
        is_jpeg, lambda: (tf.zeros([0, 0, 3], tf.uint8), tf.io.extract_jpeg_shape(encoded)),
        decode_whole)
    height, width = shape[0], shape[1]
    new_h, new_w, top, left, flip = geometry(height, width)
    if mode == "fast":
        # Halving only: choosing among 2, 4 and 8 takes nested tf.conds, slow in tf.data.
        ratio = tf.where(tf.logical_and(is_jpeg, tf.logical_and(
            (height + 1) // 2 >= new_h, (width + 1) // 2 >= new_w)), 2, 1)
        y0, x0, h, w = _source_box((height + ratio - 1) // ratio, (width + ratio - 1) // ratio,
                                   new_h, new_w, top, left, image_size)  # libjpeg's sizes

        def jpeg(r):
            return lambda: tf.io.decode_and_crop_jpeg(encoded, tf.stack([y0, x0, h, w]),
                                                      channels=3, ratio=r, dct_method=_DCT)

        box = tf.cond(is_jpeg, lambda: tf.cond(ratio == 2, jpeg(2), jpeg(1)),
                      lambda: whole[y0:y0 + h, x0:x0 + w])
        return _finish(_fast_resize(box, flip, image_size), image_size, normalize)
    win = resample.Window(height, width, new_h, new_w, top, left, image_size, image_size, flip)
    region = tf.cond(is_jpeg, lambda: _decode_jpeg_region(encoded, win, width),
                     lambda: win.region_of(whole))
    return _finish(win.resample(region), image_size, normalize)


def preprocess_for_train(image, seed, *, image_size: int = 224, resize_size: int | None = None,
                         normalize="imagenet", random_flip: bool = True, mode: str = "exact"):
    """Resize shorter side (bicubic), RandomCrop, RandomHorizontalFlip(0.5), scale, normalise:
    HWC uint8 RGB -> float32 (image_size, image_size, 3). `seed`: int64 (2,) for stateless random
    ops; `random_flip=False` for data whose class a mirror changes (digits)."""
    geometry = _geometry(seed, image_size, resize_size, random_flip)
    return _from_image(image, geometry, image_size, normalize, mode)


def preprocess_for_eval(image, *, image_size: int = 224, resize_size: int | None = None,
                        normalize="imagenet", mode: str = "exact"):
    """Resize shorter side (bicubic), CenterCrop(image_size), scale to [0,1], normalise."""
    return _from_image(image, _geometry(None, image_size, resize_size), image_size, normalize,
                       mode)


def preprocess_encoded_for_train(encoded, seed, *, image_size: int = 224,
                                 resize_size: int | None = None, normalize="imagenet",
                                 random_flip: bool = True, mode: str = "exact"):
    """`preprocess_for_train(decode(encoded), seed, ...)`, decoding only what the crop reads."""
    geometry = _geometry(seed, image_size, resize_size, random_flip)
    return _from_encoded(encoded, geometry, image_size, normalize, mode)


def preprocess_encoded_for_eval(encoded, *, image_size: int = 224,
                                resize_size: int | None = None, normalize="imagenet",
                                mode: str = "exact"):
    """`preprocess_for_eval(decode(encoded), ...)`, decoding only the part of a JPEG it reads."""
    return _from_encoded(encoded, _geometry(None, image_size, resize_size), image_size,
                         normalize, mode)
