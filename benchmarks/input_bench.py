"""Images/s per CPU core of the training and eval input transforms, tf.data against PIL.

    python benchmarks/input_bench.py                 # prints a JSON dict
    python benchmarks/input_bench.py --seconds 2     # quicker, noisier

`measure(...)` is what benchmarks/run.py calls. It makes its JPEGs itself (numpy + PIL: smooth
colour gradients plus mild noise, 500x375 and 375x500 alternately, quality 90, about 46 KB) and
times, each in one thread of one process (a subprocess, so that TensorFlow's thread pools are
set before it initialises: intra-op 1, inter-op 1, tf.data private thread pool 1):
- input_img_s_per_core: JPEG bytes -> `transforms.preprocess_encoded_for_train` (exact mode:
  PIL's pixels, only the crop's source region decoded);
- input_eval_img_s_per_core: the same, `preprocess_encoded_for_eval`;
- input_fast_img_s_per_core: `preprocess_encoded_for_train(..., mode="fast")`;
- input_old_tf_img_s_per_core: the previous tf.data transform (full decode, two
  `tf.image.resize(bicubic, antialias=True)` passes over the whole image), kept here for reference;
- input_pil_img_s_per_core / input_pil_eval_img_s_per_core: torchvision's transforms as it runs
  them on PIL (open + convert("RGB"), resize bicubic, random or centre crop, flip, /255 float32,
  normalise with numpy).
Each number is the best of repeated passes over the images, after a warm-up pass, the
pipelines taking turns (about `seconds` each), in images per CPU second of the process: one
thread's rate on one core, which stays meaningful on a shared machine where the thread waits for
a core. Also `input_decode_img_s_per_core` (TF's JPEG decode alone: how fast the machine is
today), `input_cpu_per_wall` (CPU seconds per wall second over all timed passes: about 1 on an
idle machine, lower when other work held the cores, above 1 if something ran a second thread)
and `input_jpeg_kb` (the JPEGs' mean size).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("input_img_s_per_core", "input_eval_img_s_per_core", "input_fast_img_s_per_core",
        "input_pil_img_s_per_core", "input_pil_eval_img_s_per_core",
        "input_old_tf_img_s_per_core")
MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)


def make_jpegs(num_images: int = 64, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: low-frequency colour gradients plus mild noise, 500x375 and 375x500
    alternately, quality 90 (4:2:0 chroma), about 46 KB each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_images):
        h, w = (375, 500) if i % 2 == 0 else (500, 375)
        y = np.linspace(0, 1, h)[:, None, None]
        x = np.linspace(0, 1, w)[None, :, None]
        f, p = rng.uniform(0.5, 3.0, (2, 3)), rng.uniform(0, 2 * np.pi, (2, 3))
        img = (127.5 + 60 * np.sin(2 * np.pi * f[0] * x + p[0])
               + 60 * np.cos(2 * np.pi * f[1] * y + p[1]) + rng.normal(0, 6.0, (h, w, 3)))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _best_rates(passes: dict, num_images: int, seconds: float) -> dict:
    """{key: (best images per CPU second, CPU seconds, wall seconds)} of the `passes` (key ->
    function running one pass over the images), after one untimed pass each, timed in turns
    (every round runs each once, so all share the machine's state) for about `seconds` per
    pipeline, at least 3 rounds. CPU time, not wall time: on a shared machine the process's one
    busy thread is not always on a core, and its CPU time is what one core spends per image."""
    for run_pass in passes.values():
        run_pass()
    stats = {key: [0.0, 0.0, 0.0] for key in passes}
    rounds, start = 0, time.perf_counter()
    while rounds < 3 or time.perf_counter() - start < seconds * len(passes):
        for key, run_pass in passes.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run_pass()
            dc, dt = time.process_time() - c0, time.perf_counter() - t0
            best, cpu, wall = stats[key]
            stats[key] = [max(best, num_images / dc), cpu + dc, wall + dt]
        rounds += 1
    return {key: tuple(v) for key, v in stats.items()}


# --- the pipelines -----------------------------------------------------------------------------


def _old_two_pass_train(tf, image, seed, image_size=224, resize_size=256):
    """The tf.data training transform before sttn_jax.data.transforms: the whole image resized by
    two antialiased bicubic passes (horizontal, round, vertical, round), then crop and flip."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    s = tf.constant(float(resize_size), tf.float64)
    new_h = tf.cast(tf.where(h <= w, s, tf.floor(s * h / w)), tf.int32)
    new_w = tf.cast(tf.where(h <= w, tf.floor(s * w / h), s), tf.int32)

    def resample(x, hw):
        x = tf.image.resize(x, hw, method="bicubic", antialias=True)
        return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)

    image = resample(tf.cast(image, tf.float32), tf.stack([shape[0], new_w]))
    image = resample(image, tf.stack([new_h, new_w]))
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    top = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=new_h - image_size + 1,
                                      dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=new_w - image_size + 1,
                                       dtype=tf.int32)
    image = image[top:top + image_size, left:left + image_size]
    flip = tf.random.stateless_uniform([], seeds[2]) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    image = tf.ensure_shape(image, (image_size, image_size, 3))
    return (image / 255.0 - MEAN) / STD


def _tf_passes(jpegs) -> dict:
    from sttn_jax.data import transforms
    from sttn_jax.data.tf_import import tf

    tf = tf()

    def seed_of(i):
        return tf.stack([tf.constant(0, tf.int64), i])

    maps = {
        "input_img_s_per_core":
            lambda i, e: transforms.preprocess_encoded_for_train(e, seed_of(i)),
        "input_eval_img_s_per_core": lambda i, e: transforms.preprocess_encoded_for_eval(e),
        "input_fast_img_s_per_core":
            lambda i, e: transforms.preprocess_encoded_for_train(e, seed_of(i), mode="fast"),
        "input_old_tf_img_s_per_core": lambda i, e: _old_two_pass_train(
            tf, tf.io.decode_jpeg(e, channels=3, dct_method="INTEGER_ACCURATE"), seed_of(i)),
        "input_decode_img_s_per_core": lambda i, e: tf.cast(
            tf.io.decode_jpeg(e, channels=3, dct_method="INTEGER_ACCURATE"), tf.float32),
    }
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.experimental_optimization.map_parallelization = False
    # No background thread: every element is made in the thread that asks for it.
    options.experimental_optimization.inject_prefetch = False
    options.autotune.enabled = False
    passes = {}
    for key, fn in maps.items():
        ds = tf.data.Dataset.from_tensor_slices(jpegs).enumerate().repeat().map(fn)
        passes[key] = _pull(tf, iter(ds.with_options(options)), len(jpegs))
    return passes


def _pull(tf, iterator, n: int):
    """A pass: the next n elements of a dataset iterator that lives across passes (a new
    iterator per pass would add its set-up, tens of ms, to every pass)."""
    @tf.function
    def pull():
        total = tf.constant(0.0)
        for _ in tf.range(n):
            total += next(iterator)[0, 0, 0]
        return total

    return lambda: pull().numpy()


def _pil_passes(jpegs, image_size=224, resize_size=256) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)

    def resized(encoded):
        im = Image.open(io.BytesIO(encoded)).convert("RGB")
        w, h = im.size
        size = ((resize_size, int(resize_size * h / w)) if w <= h
                else (int(resize_size * w / h), resize_size))
        return im.resize(size, Image.BICUBIC)

    def to_output(im):
        return (np.asarray(im, np.float32) / np.float32(255) - MEAN) / STD

    def train(encoded):
        im = resized(encoded)
        top = int(rng.integers(0, im.height - image_size + 1))
        left = int(rng.integers(0, im.width - image_size + 1))
        im = im.crop((left, top, left + image_size, top + image_size))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return to_output(im)

    def evaluate(encoded):
        im = resized(encoded)
        top = int(round((im.height - image_size) / 2))
        left = int(round((im.width - image_size) / 2))
        return to_output(im.crop((left, top, left + image_size, top + image_size)))

    return {"input_pil_img_s_per_core": lambda: [train(e) for e in jpegs],
            "input_pil_eval_img_s_per_core": lambda: [evaluate(e) for e in jpegs]}


def _worker(num_images: int, seconds: float) -> dict:
    """The measurements, in this process: TensorFlow must not be initialised yet."""
    from sttn_jax.data.tf_import import tf

    tf = tf()

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    jpegs = make_jpegs(num_images)
    timed = _best_rates({**_tf_passes(jpegs), **_pil_passes(jpegs)}, len(jpegs), seconds)
    out = {key: round(timed[key][0], 1) for key in KEYS + ("input_decode_img_s_per_core",)}
    cpu, wall = (sum(v[i] for v in timed.values()) for i in (1, 2))
    out["input_cpu_per_wall"] = round(cpu / wall, 3)
    out["input_jpeg_kb"] = round(float(np.mean([len(j) for j in jpegs])) / 1000, 1)
    return out


def measure(num_images: int = 64, seconds: float = 4.0) -> dict:
    """{KEYS..., "input_decode_img_s_per_core", "input_cpu_per_wall", "input_jpeg_kb"}: images/s
    per core of each pipeline, measured in a fresh single-threaded subprocess (about
    7 * seconds + 10 s in all)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           "--num-images", str(num_images), "--seconds", str(seconds)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"input benchmark worker failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seconds", type=float, default=4.0, help="timing budget per pipeline")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        result = _worker(args.num_images, args.seconds)
    else:
        result = measure(args.num_images, args.seconds)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
