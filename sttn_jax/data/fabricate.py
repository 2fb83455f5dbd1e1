"""A tiny fabricated ILSVRC2012, prepared through the real TFDS `imagenet2012` builder.

`fabricate_imagenet` writes the two tar files the real builder expects in its `manual_dir`
(`ILSVRC2012_img_train.tar`, one inner tar per synset holding `nXXXXXXXX_N.JPEG` files, and
`ILSVRC2012_img_val.tar`, holding `ILSVRC2012_val_XXXXXXXX.JPEG` files); `prepare_imagenet` runs
`tfds.builder("imagenet2012").download_and_prepare(manual_dir=...)` on them, exactly the command
one runs on the real tars; `ensure_fake_imagenet` does both once, for smoke runs on a machine with
no data. Everything downstream (`make_dataset("imagenet2012", ...)`) then reads the same TFDS
records it would read for the real ImageNet.

How the builder labels validation images (tensorflow-datasets 4.9.x, `imagenet_common.py`): it
reads the package's `validation_labels.txt` (50,000 synsets, one per validation image in name
order) and zips it with `sorted(tar.getnames())` *by position*, not by image number. A val tar
holding only a few images would therefore get the labels of val images 1, 2, 3, ... whatever
their names. `tar.getnames()` also lists directory members, which the builder's archive iterator
skips. So the fabricated val tar holds, for every image number up to the last one it needs, a
member of the real name `ILSVRC2012_val_%08d.JPEG`: a JPEG file where that image's true label is
one of the fabricated classes, an empty directory entry otherwise. Positions then line up with the
real image numbers and every JPEG gets its true ImageNet label (a few thousand 512-byte headers).
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


def _tfds_imagenet_file(name: str) -> Path:
    """A file of TFDS's own imagenet2012 builder (labels.txt, validation_labels.txt).

    Found through the package spec, so that fabricating does not import TensorFlow.
    """
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tensorflow-datasets is needed: pip install 'sttn-jax[data]'")
    root = Path(list(spec.submodule_search_locations)[0])
    for rel in ("datasets/imagenet2012", "image_classification"):
        path = root / rel / name
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} not found in the tensorflow_datasets package at {root}")


def imagenet_synsets() -> list[str]:
    """The 1000 synsets in TFDS's label order (label i is synsets[i])."""
    return _tfds_imagenet_file("labels.txt").read_text().split()


def imagenet_validation_labels() -> list[str]:
    """Synset of validation image number k (1-based) at position k - 1."""
    return _tfds_imagenet_file("validation_labels.txt").read_text().split()


def _class_colour(c: int, num_classes: int) -> np.ndarray:
    """A distinct saturated colour per class (evenly spaced hues)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(c / max(num_classes, 1), 0.85, 0.9)
    return np.array([r, g, b]) * 255.0


def _class_image(c: int, num_classes: int, shape: tuple[int, int],
                 rng: np.random.Generator) -> np.ndarray:
    """A learnable image of class c: class colour, class-specific stripes, noise, random shift."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = np.pi * c / max(num_classes, 1)
    period = 6.0 + 2.0 * (c % 3)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period + phase)
    base = _class_colour(c, num_classes)
    img = base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    img = img + rng.normal(0.0, 12.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _jpeg_bytes(img: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 0
    tar.addfile(info)


def _image_shape(image_size: Sequence[int], k: int) -> tuple[int, int]:
    """Alternates landscape and portrait so both shorter-side cases are exercised."""
    h, w = int(image_size[0]), int(image_size[1])
    return (h, w) if k % 2 == 0 else (w, h)


def fabricate_imagenet(manual_dir, num_classes: int = 4, train_per_class: int = 6,
                       val_per_class: int = 2, image_size=(40, 56), seed: int = 0) -> dict:
    """Writes a fabricated ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into manual_dir.

    The classes are the first `num_classes` synsets of TFDS's imagenet2012 label list (labels
    0 .. num_classes-1: n01440764, n01443537, ...). Train holds `train_per_class` JPEGs per class;
    validation holds the first `val_per_class` validation images (by image number) of each class,
    so that they keep their true labels (see the module docstring). Images are (h, w) =
    `image_size`, alternately transposed; each class has its own colour and stripe direction.

    Returns a dict: synsets, labels, num_train, num_val, val_image_numbers, manual_dir.
    """
    if not 1 <= num_classes <= 1000:
        raise ValueError(f"num_classes must be in 1..1000, got {num_classes}")
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    synsets = imagenet_synsets()[:num_classes]
    class_of = {s: i for i, s in enumerate(synsets)}
    rng = np.random.default_rng(seed)

    # Train: outer tar of per-synset tars.
    tmp = manual_dir / (TRAIN_TAR + ".tmp")
    with tarfile.open(tmp, "w") as outer:
        for c, syn in enumerate(synsets):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for k in range(train_per_class):
                    img = _class_image(c, num_classes, _image_shape(image_size, k), rng)
                    _add_bytes(inner, f"{syn}_{10000 + k}.JPEG", _jpeg_bytes(img))
            _add_bytes(outer, f"{syn}.tar", inner_buf.getvalue())
    os.replace(tmp, manual_dir / TRAIN_TAR)

    # Validation: the first val_per_class images of each class, by real image number.
    val_labels = imagenet_validation_labels()
    taken = {s: 0 for s in synsets}
    chosen: list[int] = []  # 1-based image numbers
    for idx, syn in enumerate(val_labels):
        if syn in taken and taken[syn] < val_per_class:
            taken[syn] += 1
            chosen.append(idx + 1)
            if len(chosen) == num_classes * val_per_class:
                break
    chosen_set = set(chosen)
    last = max(chosen) if chosen else 0
    tmp = manual_dir / (VAL_TAR + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for number in range(1, last + 1):
            name = f"ILSVRC2012_val_{number:08d}.JPEG"
            if number in chosen_set:
                c = class_of[val_labels[number - 1]]
                img = _class_image(c, num_classes, _image_shape(image_size, number), rng)
                _add_bytes(tar, name, _jpeg_bytes(img))
            else:
                _add_dir(tar, name)  # placeholder: keeps the builder's positional labels aligned
    os.replace(tmp, manual_dir / VAL_TAR)

    return {
        "manual_dir": str(manual_dir),
        "synsets": synsets,
        "labels": list(range(num_classes)),
        "num_train": num_classes * train_per_class,
        "num_val": len(chosen),
        "val_image_numbers": chosen,
    }


def prepare_imagenet(data_dir, manual_dir, num_shards: int | None = None) -> float:
    """Runs the real TFDS imagenet2012 builder on the tars in manual_dir; returns seconds taken."""
    from sttn_jax.data import pipeline  # hides the GPU from TensorFlow before tfds runs

    tfds = pipeline._tfds()
    start = time.perf_counter()
    builder = tfds.builder("imagenet2012", data_dir=os.fspath(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir),
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
            num_shards=num_shards,
        ),
    )
    return time.perf_counter() - start


def ensure_fake_imagenet(data_dir, num_shards: int | None = None, **fabricate_kwargs) -> bool:
    """Fabricates and prepares a tiny imagenet2012 into data_dir unless one is prepared there.

    Returns True when it prepared one now (about a second). The tars go to
    `data_dir/manual/imagenet2012`; `fabricate_kwargs` go to `fabricate_imagenet`.
    """
    from sttn_jax.data import pipeline

    tfds = pipeline._tfds()
    data_dir = os.fspath(data_dir)
    if tfds.builder("imagenet2012", data_dir=data_dir).is_prepared():
        return False
    manual_dir = os.path.join(data_dir, "manual", "imagenet2012")
    fabricate_imagenet(manual_dir, **fabricate_kwargs)
    prepare_imagenet(data_dir, manual_dir, num_shards=num_shards)
    return True
