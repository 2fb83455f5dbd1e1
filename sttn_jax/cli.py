"""What the command-line tools share: multi-host start-up flags, XLA's compilation cache, one
logging path, the command line's parsing (`sttn_jax.cli_parse`), and every expected error as one
line `error: ...` on stderr with exit status 2."""
import contextlib
import logging as std_logging
import os
import re
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from sttn_jax.cli_parse import (check_output_file, define_config_flag, print_config,  # noqa: F401
                                run, usage_error)
from sttn_jax.errors import EXPECTED, ArchMismatchError

flags.disclaim_key_flags()  # the flags defined here belong to the tool: its --help lists them

FLAGS = flags.FLAGS
QUIET_LOGGERS = ("jax._src", "orbax", "tensorflow", "tensorflow_datasets")
TOOLS = ("train.py", "eval.py", "merge.py")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.py"


def define_distributed_flags() -> None:
    """The flags of a multi-host start (read by `init_distributed`)."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster "
                      "auto-detection (TPU pods, SLURM) even without the three flags above.")
    # JAX's default is 100 s; 30 s still spans any pause of the (native) heartbeat thread.
    flags.DEFINE_integer("heartbeat_timeout_seconds", 30, "Multi-host runs: a process silent "
                         "this long counts as dead, and every other process then stops.")


def start(argv, distributed: bool = True) -> None:
    """A tool's first step: no positional arguments, logging set up, multi-host JAX if asked."""
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])} (flags are spelled --name=value; "
                    "--help lists them)")
    setup_logging()
    if distributed:
        init_distributed()
    enable_compilation_cache(FLAGS.compilation_cache_dir)


def enable_compilation_cache(setting: str) -> str | None:
    """Points JAX's compilation cache at `setting` unless JAX has one; returns the directory, or
    None. "auto" is off on a CPU: the cache key there does not name the instruction set."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if setting == "auto":
        if jax.default_backend() == "cpu":
            return None
        setting = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "sttn-jax", "xla")
    if setting in ("", "none"):
        return None
    path = os.path.expanduser(setting)
    jax.config.update("jax_compilation_cache_dir", path)
    logging.info("XLA compilation cache: %s", path)
    return path


def init_distributed() -> None:
    """jax.distributed.initialize() for multi-process runs. When a process dies, a collective with
    it fails at once (`_LostPeer`); else JAX aborts within the heartbeat timeout."""
    import jax

    many = FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
    if not (many or FLAGS.distributed):
        return
    app.install_exception_handler(_LostPeer())
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)


class _LostPeer(app.ExceptionHandler):
    """A collective failed on a broken connection: one `error:` line and an immediate exit."""

    def wants(self, exc) -> bool:
        import jax

        return (isinstance(exc, jax.errors.JaxRuntimeError) and jax.process_count() > 1
                and re.search(r"Gloo [\w -]+? failed", str(exc)) is not None)

    def handle(self, exc) -> None:
        detail = re.sub(r"\[\S+:\d+\] ", "", str(exc).strip().splitlines()[0])
        detail = re.sub(r"^[A-Z_]+: ", "", detail)  # the status word (UNKNOWN:, INTERNAL:, ...)
        print(f"error: lost contact with another process (in a collective: {detail}); this "
              "process stopped too: run the same command on every host to resume",
              file=sys.stderr, flush=True)
        os._exit(1)


def _own_lines_at_info(record) -> bool:
    """Below WARNING only sttn-jax's own lines (and no TFDS warnings) unless --verbosity >= 1."""
    if FLAGS.verbosity >= 1:
        return True
    if "tensorflow_datasets" in record.pathname:
        return record.levelno >= std_logging.ERROR
    return (record.levelno >= std_logging.WARNING or "sttn_jax" in record.pathname
            or Path(record.pathname).name in TOOLS)


def setup_logging() -> None:
    """Our lines at --verbosity (INFO by default) on stderr; the libraries' from WARNING up."""
    # TensorFlow's (oneDNN's, XLA's) C++ lines below FATAL, harmless `E0000 ...` ones among them,
    # only at --verbosity >= 1: read when TensorFlow or jaxlib loads, so set first.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if FLAGS.verbosity >= 1 else "3"
    for name in QUIET_LOGGERS:
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    logging.get_absl_handler().addFilter(_own_lines_at_info)


@contextlib.contextmanager
def one_line_errors(exit_status: dict | None = None):
    """Expected failures print `error: <message>` as one line, in flag words (`in_flag_words`),
    and exit 2 (or their class's `exit_status`), without a stack trace."""
    try:
        yield
    except EXPECTED as e:
        message = " ".join(line.strip() for line in in_flag_words(e).splitlines() if line.strip())
        print(f"error: {message or type(e).__name__}", file=sys.stderr, flush=True)
        sys.exit((exit_status or {}).get(type(e), 2))


def in_flag_words(e: BaseException) -> str:
    """The message of `e` naming the tools' flags where the library names its parameters."""
    if isinstance(e, ArchMismatchError) and e.known:
        if (e.found, e.wanted) == ("resnet18_bwx2", "resnet18_ter"):
            fix = (f"merge it first (python merge.py --checkpoint {e.path} --out DST), or pass "
                   f"--arch {e.found}")
        else:
            fix = f"pass --arch {e.found} or leave --arch out"
        return f"{e.path}: holds a {e.found} model, not {e.wanted}; {fix}"
    return str(e)


def define_compilation_cache_flag() -> None:
    """--compilation_cache_dir, read by `start` (defined once even if a tool loads twice)."""
    if "compilation_cache_dir" in FLAGS:
        return
    flags.DEFINE_string(
        "compilation_cache_dir", "auto", "XLA's persistent compilation cache: a restarted or "
        "repeated run loads its compiled steps instead of compiling them again. 'auto': "
        "$XDG_CACHE_HOME/sttn-jax/xla (~/.cache/...) on a GPU or TPU, none on a CPU; a directory: "
        "that one, on any backend; '' or 'none': no cache. JAX_COMPILATION_CACHE_DIR, if set, wins.")


def config_for(config_flag, loaded):
    """(config, origin) to evaluate `loaded` with: the --config file if given, else the training
    run's config it records over the defaults, else the defaults; --config.KEY on top."""
    if config_flag.present:
        return config_flag.value, "--config"
    config = config_flag.value
    recorded = loaded.run_config
    if recorded:
        with config.unlocked():
            config.update({k: v for k, v in recorded.items() if k in config})
        for key, value in config_flags.get_override_values(config_flag).items():
            config[key] = value
        logging.info("config: the training run's, as %s records it (dataset %s, %dx%d, data_dir "
                     "%s; --config FILE to use another)", loaded.path, config.dataset,
                     config.image_size, config.image_size, config.data_dir)
        return config, "recorded"
    logging.info("config: %s (%s records no training config; --config FILE to use another)",
                 config_flags.get_config_filename(config_flag), loaded.path)
    return config, None
