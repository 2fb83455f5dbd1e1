"""TensorFlow and TFDS, imported once, on first use, and only here, with every GPU hidden from
TensorFlow so that the input pipeline never takes accelerator memory from JAX."""
import contextlib
import functools
import os
import re
import sys
import tempfile

# What TensorFlow's native libraries print while they load, before its log level applies;
# dropped unless TF_CPP_MIN_LOG_LEVEL is 0 (--verbosity >= 1).
_LOAD_NOISE = re.compile(r"^(?:[IW]\d{4} .*\] |WARNING: All log messages before absl::InitializeLog"
                         r"|To enable the following instructions: )")


@contextlib.contextmanager
def _native_stderr_filtered():
    """stderr (the file descriptor) collected while the block runs, then written back without the
    lines of _LOAD_NOISE when TensorFlow's log level asks for quiet."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
                    if not _LOAD_NOISE.match(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


@functools.cache
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Triton imported after TensorFlow crashes the process; jax-triton and torch import it later.
    if "tensorflow" not in sys.modules:
        with contextlib.suppress(ImportError):
            import triton  # noqa: F401
    with _native_stderr_filtered():
        import tensorflow

    with contextlib.suppress(Exception):  # already initialised, or no GPU support at all
        tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


@functools.cache
def tfds():
    tf()
    with _native_stderr_filtered():
        import tensorflow_datasets

    return tensorflow_datasets
