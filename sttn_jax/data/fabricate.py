"""A tiny fabricated ILSVRC2012, prepared by the real TFDS `imagenet2012` builder from the two
tars it expects in its manual_dir, so smoke runs read the records the real ImageNet gives. The
builder labels validation images by position (`validation_labels.txt` zipped with the sorted
member names, directories skipped), so the val tar holds a member for every image number up to the
last needed: a JPEG where its true label is a fabricated class, an empty directory otherwise.
"""

import colorsys
import importlib.util
import io
import os
import tarfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sttn_jax import json_io
from sttn_jax.data import tf_import

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


def _tfds_imagenet_file(name: str) -> Path:
    """A file of TFDS's imagenet2012 builder, found without importing TensorFlow."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tensorflow-datasets is missing: reinstall sttn-jax (pip install -e . "
                          "or make install)")
    root = Path(list(spec.submodule_search_locations)[0])
    for rel in ("datasets/imagenet2012", "image_classification"):
        path = root / rel / name
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} not found in the tensorflow_datasets package at {root}")


def imagenet_synsets() -> list[str]:
    """The 1000 synsets in TFDS's label order (label i is synsets[i])."""
    return _tfds_imagenet_file("labels.txt").read_text().split()


def _class_colour(c: int, num_classes: int) -> np.ndarray:
    """A distinct saturated colour per class (evenly spaced hues)."""
    r, g, b = colorsys.hsv_to_rgb(c / max(num_classes, 1), 0.85, 0.9)
    return np.array([r, g, b]) * 255.0


def _class_jpeg(c: int, num_classes: int, image_size: Sequence[int], k: int,
                rng: np.random.Generator) -> bytes:
    """A learnable JPEG of class c, transposed for odd k so both shorter-side cases occur."""
    from PIL import Image

    h, w = int(image_size[0]), int(image_size[1])
    if k % 2:
        h, w = w, h
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = np.pi * c / max(num_classes, 1)
    period = 6.0 + 2.0 * (c % 3)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period + phase)
    img = _class_colour(c, num_classes) * (0.75 + 0.25 * stripes[..., None])
    img = img + rng.normal(0.0, 12.0, size=img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    """A file member holding `data`, or an empty directory member for None."""
    info = tarfile.TarInfo(name)
    info.size = len(data or b"")
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info, None if data is None else io.BytesIO(data))


def fabricate_imagenet(manual_dir, num_classes: int = 4, train_per_class: int = 6,
                       val_per_class: int = 2, image_size=(40, 56), seed: int = 0) -> dict:
    """Writes the two tars into manual_dir for the first `num_classes` synsets of TFDS's list.
    Returns {manual_dir, synsets, labels, num_train, num_val, val_image_numbers}."""
    if not 1 <= num_classes <= 1000:
        raise ValueError(f"num_classes must be in 1..1000, got {num_classes}")
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    synsets = imagenet_synsets()[:num_classes]
    class_of = {s: i for i, s in enumerate(synsets)}
    rng = np.random.default_rng(seed)

    # Train: outer tar of per-synset tars.
    with json_io.written_aside(manual_dir / TRAIN_TAR) as tmp, tarfile.open(tmp, "w") as outer:
        for c, syn in enumerate(synsets):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for k in range(train_per_class):
                    _add(inner, f"{syn}_{10000 + k}.JPEG",
                         _class_jpeg(c, num_classes, image_size, k, rng))
            _add(outer, f"{syn}.tar", inner_buf.getvalue())

    # Validation: val_labels[k - 1] is the synset of image number k.
    val_labels = _tfds_imagenet_file("validation_labels.txt").read_text().split()
    taken = {s: 0 for s in synsets}
    chosen: list[int] = []  # 1-based image numbers
    for number, syn in enumerate(val_labels, 1):
        if syn in taken and taken[syn] < val_per_class:
            taken[syn] += 1
            chosen.append(number)
    chosen_set = set(chosen)
    with json_io.written_aside(manual_dir / VAL_TAR) as tmp, tarfile.open(tmp, "w") as tar:
        for number in range(1, max(chosen, default=0) + 1):
            data = None  # a placeholder: keeps the builder's positional labels aligned
            if number in chosen_set:
                data = _class_jpeg(class_of[val_labels[number - 1]], num_classes, image_size,
                                   number, rng)
            _add(tar, f"ILSVRC2012_val_{number:08d}.JPEG", data)

    return {"manual_dir": str(manual_dir), "synsets": synsets, "labels": list(range(num_classes)),
            "num_train": num_classes * train_per_class, "num_val": len(chosen),
            "val_image_numbers": chosen}


def prepare_imagenet(data_dir, manual_dir, num_shards: int | None = None) -> float:
    """Runs the real TFDS imagenet2012 builder on the tars in manual_dir; returns seconds taken."""
    tfds = tf_import.tfds()
    start = time.perf_counter()
    builder = tfds.builder("imagenet2012", data_dir=os.fspath(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir), try_download_gcs=False, num_shards=num_shards,
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return time.perf_counter() - start


def ensure_fake_imagenet(data_dir, num_shards: int | None = None, **fabricate_kwargs) -> bool:
    """Fabricates and prepares a tiny imagenet2012 in data_dir unless there; True if it did now."""
    data_dir = os.fspath(data_dir)
    if tf_import.tfds().builder("imagenet2012", data_dir=data_dir).is_prepared():
        return False
    manual_dir = os.path.join(data_dir, "manual", "imagenet2012")
    fabricate_imagenet(manual_dir, **fabricate_kwargs)
    prepare_imagenet(data_dir, manual_dir, num_shards=num_shards)
    return True
