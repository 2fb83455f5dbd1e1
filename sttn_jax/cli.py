"""What the command-line tools share: absl flags for multi-host start-up, XLA's persistent
compilation cache, one logging path (absl logging: --verbosity, and a log file in the workdir), and
the expected errors as one line on stderr with exit status 2. Flags are spelled with underscores and
listed by each tool's --help."""
import contextlib
import json
import logging as std_logging
import os
import re
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from sttn_jax.errors import EXPECTED, ConfigError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
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
    step of their work at INFO through absl too)."""
    return (record.levelno >= std_logging.WARNING or FLAGS.verbosity >= 1
            or "sttn_jax" in record.pathname or Path(record.pathname).name in TOOLS)


def setup_logging() -> None:
    """Our lines at --verbosity (INFO by default) on stderr; the libraries' from WARNING up."""
    for name in QUIET_LOGGERS:
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    logging.get_absl_handler().addFilter(_own_lines_at_info)


@contextlib.contextmanager
def one_line_errors(exit_status: dict | None = None):
    """Expected failures print `error: <message>` and exit 2 (or their class's `exit_status`),
    without a stack trace; the message is joined into one line, the last of stderr, whole."""
    try:
        yield
    except EXPECTED as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message or type(e).__name__}", file=sys.stderr, flush=True)
        sys.exit((exit_status or {}).get(type(e), 2))


def _parse_flags(argv):
    """absl's parsing, with an unknown `--config.KEY` as one line (it keeps the "did you mean")."""
    try:
        return app.parse_flags_with_usage(argv)
    except AttributeError as e:  # ml_collections' locked config refuses the key
        text = str(e).strip("\"'").replace("\\n", "\n").replace("\\'", "'")
        key = text.splitlines()[0].strip("'\"")
        given = next((a for a in argv if a.startswith(f"--config.{key}")), f"--config.{key}")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        print(f"error: unknown config key {key!r} in {given}: the config file has no such key"
              + (f"; did you mean --config.{hint.group(1)}?" if hint else ""), file=sys.stderr)
        sys.exit(2)


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


def run(main, argv=None, legacy_flags: dict | None = None) -> None:
    """app.run(main), accepting the old spellings of renamed flags ({"--old": "--new"})."""
    argv = list(sys.argv if argv is None else argv)
    for old, new in (legacy_flags or {}).items():
        argv = [new + a[len(old):] if a == old or a.startswith(old + "=") else a for a in argv]
    app.run(main, argv=argv, flags_parser=_parse_flags)


def config_for(config_flag, source):
    """The config to evaluate `source` with: the --config file if given, else the config.json of
    the workdir `source` belongs to (over the defaults), else the defaults; then --config.KEY."""
    if config_flag.present:
        return config_flag.value
    config = config_flag.value
    path = Path(source or ".").absolute()
    saved = next((p / "config.json" for p in (path, *path.parents[:3])
                  if (p / "config.json").is_file()), None)
    if saved is not None:
        try:
            values = json.loads(saved.read_text())
        except ValueError:
            raise ConfigError(f"{saved} is not valid JSON; pass the run's config file with "
                              "--config") from None
        with config.unlocked():
            config.update({k: v for k, v in values.items() if k in config})
        logging.info("config: %s (from the training run)", saved)
    for key, value in config_flags.get_override_values(config_flag).items():
        config[key] = value
    return config
