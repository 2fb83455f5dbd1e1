"""Shared plumbing of the command-line tools: logging, multi-host start-up, and turning the
library's expected errors (bad config, bad checkpoint, missing data) into one line on stderr."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def setup_logging(level=logging.INFO) -> None:
    """Our log lines at INFO on stderr; the libraries' chatter only from WARNING up."""
    ours = logging.getLogger("sttn_jax")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def define_distributed_flags() -> None:
    """--coordinator_address / --num_processes / --process_id / --distributed (train.py, eval.py)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster "
                      "auto-detection (TPU pods, SLURM) even without the three flags above.")


def init_distributed_from_flags() -> None:
    from absl import flags

    f = flags.FLAGS
    init_distributed(f.coordinator_address, f.num_processes, f.process_id, f.distributed)


def init_distributed(coordinator_address=None, num_processes=None, process_id=None,
                     auto: bool = False) -> None:
    """jax.distributed.initialize() for multi-process runs; a no-op for one process."""
    import jax

    if coordinator_address or num_processes or process_id is not None:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif auto:
        jax.distributed.initialize()


def expected_errors() -> tuple:
    from sttn_jax.checkpoints import CheckpointError
    from sttn_jax.preflight import ConfigError
    from sttn_jax.run_checkpoints import CheckpointWriteError

    errors = [CheckpointError, ConfigError, CheckpointWriteError, FloatingPointError,
              FileNotFoundError]
    pipeline = sys.modules.get("sttn_jax.data.pipeline")  # only if loaded: it imports TensorFlow
    if pipeline is not None:
        errors.append(pipeline.DatasetNotPreparedError)
    return tuple(errors)


@contextlib.contextmanager
def one_line_errors():
    """Expected failures print `error: <message>` and exit 2, without a stack trace. The
    message is joined into one line (some, such as the "not prepared" hint with its `tfds build`
    command, span several), so the error is always the last line of stderr, whole."""
    try:
        yield
    except expected_errors() as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message or type(e).__name__}", file=sys.stderr)
        sys.exit(2)


def _config_path(argv, default=None):
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def check_config_overrides(argv, default_config=None) -> None:
    """Refuses `--config.KEY=...` for a KEY the config file does not have, listing the valid keys,
    before absl parses the flags (whose own message for this is a stack trace)."""
    path = _config_path(argv, default_config)
    keys = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not path or not keys:
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sttn_cli_config", path)
    if spec is None or not os.path.isfile(path):
        print(f"error: config file {path} does not exist; pick one in configs/", file=sys.stderr)
        sys.exit(2)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.getcwd())
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    config = module.get_config()
    valid = sorted(config.keys())
    for key in keys:
        top = key.split(".", 1)[0]
        if top not in valid:
            print(f"error: unknown config key {key!r} in --config.{key}; {path} has: "
                  f"{', '.join(valid)}", file=sys.stderr)
            sys.exit(2)
