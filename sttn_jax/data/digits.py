"""`sttn_digits`: scikit-learn's embedded 8x8 handwritten digits as a TFDS dataset (no download):
the 1797 images scaled to 0..255 and upsampled 4x to 32x32 RGB PNGs; a fixed stratified split:
every 5th example of each class is test (1442 train, 355 test). `ensure_digits` builds it once.
"""

import functools
import os

import numpy as np

from sttn_jax.data.tf_import import tfds

UPSAMPLE = 4
TEST_EVERY = 5


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 32, 32, 3), labels int64 (1797,)) in scikit-learn's order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = images.repeat(UPSAMPLE, axis=1).repeat(UPSAMPLE, axis=2)
    images = np.repeat(images[..., None], 3, axis=-1)
    return images, data.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified fixed split: every TEST_EVERY-th example of each class is test."""
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test[members[TEST_EVERY - 1::TEST_EVERY]] = True
    return {"train": np.flatnonzero(~test), "test": np.flatnonzero(test)}


@functools.cache
def register():
    """Defines (so registers with TFDS) the builder; deferred: importing this must not import TF."""
    core, features = tfds().core, tfds().features

    class SttnDigits(core.GeneratorBasedBuilder):
        """scikit-learn's 8x8 digits, upsampled to 32x32 RGB."""

        VERSION = core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Initial release."}

        def _info(self):
            return self.dataset_info_from_configs(
                description="scikit-learn's embedded 8x8 handwritten digits (UCI optdigits test "
                            "part), upsampled to 32x32 RGB.",
                features=features.FeaturesDict({
                    "image": features.Image(shape=(32, 32, 3), encoding_format="png"),
                    "label": features.ClassLabel(num_classes=10),
                }),
                supervised_keys=("image", "label"),
                homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return {split: self._generate_examples(split) for split in ("train", "test")}

        def _generate_examples(self, split):
            images, labels = digits_arrays()
            for i in split_indices(labels)[split]:
                yield int(i), {"image": images[i], "label": int(labels[i])}

    return SttnDigits


def ensure_digits(data_dir) -> bool:
    """Builds sttn_digits into data_dir unless it is there; True when it built it now."""
    register()
    builder = tfds().builder("sttn_digits", data_dir=os.fspath(data_dir))
    if builder.is_prepared():
        return False
    builder.download_and_prepare(download_config=tfds().download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds().download.ComputeStatsMode.SKIP))
    return True
