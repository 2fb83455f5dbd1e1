"""What the command-line tools share: absl flags for multi-host start-up, XLA's persistent
compilation cache, one logging path (absl logging: --verbosity, and a log file in the workdir; the
native libraries' log lines only at --verbosity >= 1), the parsing of the command line with every
mistake as one line (`sttn_jax.cli_parse`: run, define_config_flag, print_config,
check_output_file, usage_error), and every expected error as one line `error: ...` on stderr with
exit status 2."""
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
    # JAX's default is 100 s. 30 s still spans any pause of the heartbeat thread (it runs outside
    # Python) and stops the others in under a minute (28.6 s after a peer's SIGKILL on CPU).
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
    """Points JAX's persistent compilation cache at `setting` (see --compilation_cache_dir) unless
    JAX already has one (JAX_COMPILATION_CACHE_DIR); returns the directory in use, or None.
    "auto" stays off on a CPU: JAX's cache key for CPU executables does not name the host's
    instruction set, so a cache shared between machines could hand one code it cannot run."""
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
    """jax.distributed.initialize() for multi-process runs; nothing for one process. When a
    process dies, the others stop within the heartbeat timeout (plus the step in progress): a
    collective already exchanging data with it fails at once (`_LostPeer`: exit status 1); anywhere
    else JAX's runtime aborts (SIGABRT, exit status 134) naming the task that went silent."""
    import jax

    many = FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
    if not (many or FLAGS.distributed):
        return
    app.install_exception_handler(_LostPeer())
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)


class _LostPeer(app.ExceptionHandler):
    """A collective failed on a broken connection: one `error:` line and an immediate exit (a normal
    one would wait in the shutdown barrier for the lost process, then abort with stack traces)."""

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
    """Below WARNING only sttn-jax's own lines, unless --verbosity >= 1 (Orbax and clu log every
    step of their work at INFO through absl too); TFDS's warnings about the folders it scans (a
    version folder without dataset_info.json, ...) only at --verbosity >= 1 as well."""
    if FLAGS.verbosity >= 1:
        return True
    if "tensorflow_datasets" in record.pathname:
        return record.levelno >= std_logging.ERROR
    return (record.levelno >= std_logging.WARNING or "sttn_jax" in record.pathname
            or Path(record.pathname).name in TOOLS)


def quiet_native_logs(verbosity: int) -> None:
    """TensorFlow's (and so oneDNN's and XLA's) C++ log lines below FATAL only at --verbosity >= 1:
    on a CPU they include an `E0000 ... oneDNN supports DT_UINT8 only on platforms with AVX-512`
    that reads like a failure and is none. Read once, when TensorFlow or jaxlib is first loaded:
    so called before either is imported. Numerics are untouched (this is logging only)."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbosity >= 1 else "3"


def setup_logging() -> None:
    """Our lines at --verbosity (INFO by default) on stderr; the libraries' from WARNING up."""
    quiet_native_logs(FLAGS.verbosity)
    for name in QUIET_LOGGERS:
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    logging.get_absl_handler().addFilter(_own_lines_at_info)


@contextlib.contextmanager
def one_line_errors(exit_status: dict | None = None):
    """Expected failures print `error: <message>` and exit 2 (or their class's `exit_status`),
    without a stack trace; the message is joined into one line, the last of stderr, whole. The
    library's words for what a flag gives are turned into the flag's (`in_flag_words`)."""
    try:
        yield
    except EXPECTED as e:
        message = " ".join(line.strip() for line in in_flag_words(e).splitlines() if line.strip())
        print(f"error: {message or type(e).__name__}", file=sys.stderr, flush=True)
        sys.exit((exit_status or {}).get(type(e), 2))


def in_flag_words(e: BaseException) -> str:
    """The message of `e` as a command-line user needs it: the library names its parameters, the
    tools name their flags (this is the one table between the two)."""
    if isinstance(e, ArchMismatchError) and e.known:
        if (e.found, e.wanted) == ("resnet18_bwx2", "resnet18_ter"):
            fix = (f"merge it first (python merge.py --checkpoint {e.path} --out DST), or pass "
                   f"--arch {e.found}")
        else:
            fix = f"pass --arch {e.found} or leave --arch out"
        return f"{e.path}: holds a {e.found} model, not {e.wanted}; {fix}"
    return str(e)


def define_compilation_cache_flag() -> None:
    """--compilation_cache_dir, which every tool defines (read by `start`; defined once even when
    a tool's module is loaded twice in one process)."""
    if "compilation_cache_dir" in FLAGS:
        return
    flags.DEFINE_string(
        "compilation_cache_dir", "auto", "XLA's persistent compilation cache: a restarted or "
        "repeated run loads its compiled steps instead of compiling them again. 'auto': "
        "$XDG_CACHE_HOME/sttn-jax/xla (~/.cache/...) on a GPU or TPU, none on a CPU; a directory: "
        "that one, on any backend; '' or 'none': no cache. JAX_COMPILATION_CACHE_DIR, if set, wins.")


def config_for(config_flag, loaded):
    """The config to evaluate the model `loaded` (a `model_io.LoadedModel`) with, and where it came
    from: the --config file if given; else the config of the training run the model records (a
    workdir's config.json, a merged model's or packed file's copy of it) over the defaults; else
    the defaults. The --config.KEY overrides apply on top in every case."""
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
