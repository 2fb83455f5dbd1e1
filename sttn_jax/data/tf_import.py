"""TensorFlow and TFDS, imported once and on first use, with every GPU hidden from TensorFlow so
that the input pipeline never takes accelerator memory from JAX. Nothing else in sttn-jax imports
TensorFlow."""
import contextlib
import functools
import os
import sys


@functools.cache
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Triton 3.7 imported after TensorFlow 2.21 crashes the process (a segmentation fault,
    # measured), imported before it does not: jax-triton and torch import it later on.
    if "tensorflow" not in sys.modules:
        with contextlib.suppress(ImportError):
            import triton  # noqa: F401
    import tensorflow

    with contextlib.suppress(Exception):  # already initialised, or no GPU support at all
        tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


@functools.cache
def tfds():
    tf()
    import tensorflow_datasets

    return tensorflow_datasets
