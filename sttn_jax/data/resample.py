"""PIL's fixed-point bicubic resampling (Pillow's Resample.c for 8-bit images) in TF ops, over a
window of the output only: the resize behind the exact transforms (`sttn_jax.data.transforms`).
Integer weights with 22 fraction bits, each pass rounded to uint8, in Pillow's order of passes.
"""

from sttn_jax.data.tf_import import tf as _tf

PRECISION_BITS = 22  # PIL's fixed-point weights for 8-bit images


def _bicubic(x):
    """PIL's bicubic kernel, a = -0.5, in PIL's order of float64 operations."""
    tf = _tf()
    x = tf.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def precompute_coeffs(in_size, out_size, start, count: int):
    """PIL's taps (source index, integer weight), int32 (count, taps), for outputs start ..
    start + count - 1 of an in_size -> out_size resize, in PIL's float64 order: PIL's exactly."""
    tf = _tf()
    f64 = tf.float64
    scale = tf.cast(in_size, f64) / tf.cast(out_size, f64)
    filterscale = tf.maximum(scale, 1.0)
    support = 2.0 * filterscale
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(start, start + count), f64) + 0.5) * scale
    xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)  # C casts truncate
    xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - xmin
    x = tf.range(ksize)
    index = xmin[:, None] + x
    w = _bicubic((tf.cast(index, f64) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = tf.where(x < xmax[:, None], w, 0.0)
    total = tf.math.cumsum(w, axis=1)[:, -1:]
    w = tf.where(total != 0.0, w / total, w) * float(1 << PRECISION_BITS)
    k = tf.cast(tf.where(w < 0.0, w - 0.5, w + 0.5), tf.int32)
    taps = tf.reduce_max(xmax)  # ksize is PIL's bound; the window may need fewer taps
    return tf.minimum(index, in_size - 1)[:, :taps], k[:, :taps]


def _pass(x, index, k):
    """One PIL pass along axis 0 of x (n, m, C) -> (count, m, C): out[i] = clip8((2^21 + sum_j
    k[i, j] * x[index[i, j]]) >> 22) in int32 as PIL (|sum| < 2^31), on gathered whole rows."""
    tf = _tf()
    shape = tf.shape(x)
    x = tf.cast(tf.reshape(x, [shape[0], -1]), tf.int32)
    acc = tf.linalg.matmul(k[:, None, :], tf.gather(x, index))[:, 0]
    acc = tf.bitwise.right_shift(acc + (1 << (PRECISION_BITS - 1)), PRECISION_BITS)
    y = tf.cast(tf.clip_by_value(acc, 0, 255), tf.float32)
    return tf.reshape(y, [tf.shape(index)[0], shape[1], shape[2]])


def vertical_first(in_h, in_w, out_h, out_w):
    """Pillow 13's order of passes: vertical first when the height shrinks over twice as much."""
    tf = _tf()
    return tf.logical_and(out_h < in_h, 2 * (in_w - out_w) < in_h - out_h)


class Window:
    """An output window's taps: the source region it reads (rows row0 .. row0 + num_rows - 1,
    likewise the columns) and per output row / column its taps there; a flip reverses columns."""

    def __init__(self, in_h, in_w, out_h, out_w, top, left, crop_h: int, crop_w: int,
                 flip=False):
        tf = _tf()
        rows, self.kr = precompute_coeffs(in_h, out_h, top, crop_h)
        cols, kc = precompute_coeffs(in_w, out_w, left, crop_w)
        self.row0, self.col0 = rows[0, 0], cols[0, 0]
        self.num_rows, self.num_cols = rows[-1, -1] + 1 - self.row0, cols[-1, -1] + 1 - self.col0
        self.rows, cols = rows - self.row0, cols - self.col0
        self.cols = tf.where(flip, tf.reverse(cols, [0]), cols)
        self.kc = tf.where(flip, tf.reverse(kc, [0]), kc)
        self.vertical_first = vertical_first(in_h, in_w, out_h, out_w)

    def resample(self, region):
        """The window (float32 0..255) from the uint8 source region: PIL's two passes in Pillow's
        order, without a tf.cond around them (slower in tf.data)."""
        tf = _tf()
        first = self.vertical_first
        (index_a, k_a), (index_b, k_b) = tf.cond(
            first, lambda: ((self.rows, self.kr), (self.cols, self.kc)),
            lambda: ((self.cols, self.kc), (self.rows, self.kr)))
        x = tf.transpose(tf.cast(region, tf.float32), tf.where(first, [0, 1, 2], [1, 0, 2]))
        x = _pass(tf.transpose(_pass(x, index_a, k_a), [1, 0, 2]), index_b, k_b)
        return tf.transpose(x, tf.where(first, [1, 0, 2], [0, 1, 2]))

    def region_of(self, image):
        """The source region, cut from the whole image."""
        return image[self.row0:self.row0 + self.num_rows, self.col0:self.col0 + self.num_cols]
