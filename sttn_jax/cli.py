"""What the command-line tools share: absl flags for multi-host start-up, one logging path (absl
logging: --verbosity, and a log file in the workdir), and the expected errors as one line on
stderr with exit status 2.

Every tool is an absl app with flags spelled with underscores, each defined in the tool itself so
that its --help lists them all."""
from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import re
import sys
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from sttn_jax.errors import EXPECTED, ConfigError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
QUIET_LOGGERS = ("jax._src", "orbax", "tensorflow", "tensorflow_datasets")
TOOLS = ("train.py", "eval.py", "merge.py")


def define_distributed_flags() -> None:
    """--coordinator_address / --num_processes / --process_id / --distributed, and how soon a
    process that stopped is noticed (--heartbeat_timeout_seconds)."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster "
                      "auto-detection (TPU pods, SLURM) even without the three flags above.")
    # JAX's default is 100 s. 30 s still spans any pause of the heartbeat thread (it runs outside
    # Python: compiles and long steps do not delay it) and stops the others in under a minute:
    # measured 28.6 s after a peer's SIGKILL on CPU (when not in a collective with it).
    flags.DEFINE_integer("heartbeat_timeout_seconds", 30, "Multi-host runs: a process silent "
                         "this long counts as dead, and every other process then stops.")


def init_distributed() -> None:
    """jax.distributed.initialize() for multi-process runs; nothing for one process.

    When a process dies (killed, host lost), the others stop within the heartbeat timeout (plus the
    step in progress), in one of two ways (both seen on CPU with Gloo, after a SIGKILL of one of
    two processes): a collective already exchanging data with it fails at once, which `_LostPeer`
    turns into one `error:` line and exit status 1; anywhere else, JAX's runtime notices the
    missing heartbeats and aborts the process (SIGABRT, exit status 134) with its own message
    naming the task that stopped sending them."""
    import jax

    many = FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
    if not (many or FLAGS.distributed):
        return
    app.install_exception_handler(_LostPeer())
    kwargs = dict(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    if many:
        kwargs.update(coordinator_address=FLAGS.coordinator_address,
                      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    jax.distributed.initialize(**kwargs)


class _LostPeer(app.ExceptionHandler):
    """A collective that failed on a broken connection to another process becomes one `error:`
    line, and the process ends at once: a normal exit would first wait in jax.distributed's
    shutdown barrier for the lost process, then abort with stack traces."""

    def wants(self, exc) -> bool:
        import jax

        return (isinstance(exc, jax.errors.JaxRuntimeError) and jax.process_count() > 1
                and re.search(r"Gloo \S+ failed", str(exc)) is not None)

    def handle(self, exc) -> None:
        detail = re.sub(r"\[\S+:\d+\] ", "", str(exc).strip().splitlines()[0])
        print(f"error: lost contact with another process (in a collective: {detail}); this "
              "process stopped too: run the same command on every host to resume",
              file=sys.stderr, flush=True)
        os._exit(1)


class _OwnLinesAtInfo(std_logging.Filter):
    """Below WARNING, only sttn-jax's own lines pass, unless --verbosity is 1 or more: Orbax and
    clu log every step of their work at INFO through absl too."""

    def filter(self, record) -> bool:
        return (record.levelno >= std_logging.WARNING or FLAGS.verbosity >= 1
                or "sttn_jax" in record.pathname or Path(record.pathname).name in TOOLS)


def setup_logging() -> None:
    """Our lines at --verbosity (INFO by default) on stderr, once each; the libraries' chatter only
    from WARNING up (all of it with --verbosity=1)."""
    for name in QUIET_LOGGERS:
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    logging.get_absl_handler().addFilter(_OwnLinesAtInfo())
    sys.unraisablehook = _drop_stale_reads(sys.unraisablehook)


def _drop_stale_reads(previous):
    """An unraisable-exception hook without the aftermath of a failed Orbax restore: the reads it
    still had in flight end later and call back into its closed event loop, which Python reports
    as an "Event loop is closed" traceback each (124 for one truncated file, measured), after the
    tool's one error line."""
    def hook(report):
        frames = traceback.extract_tb(report.exc_traceback)
        if not (report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed"
                and frames and frames[0].name == "call_soon_threadsafe"):
            previous(report)

    return hook


@contextlib.contextmanager
def one_line_errors():
    """Expected failures print `error: <message>` and exit 2, without a stack trace. The message
    is joined into one line (the "not prepared" hint spans several), so the error is always the
    last line of stderr, whole."""
    try:
        yield
    except EXPECTED as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message or type(e).__name__}", file=sys.stderr, flush=True)
        sys.exit(2)


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.py"


def _parse_flags(argv):
    """absl's own parsing, with an unknown `--config.KEY` (ml_collections' locked config refuses
    it, with a traceback) turned into one line that keeps its "did you mean"."""
    try:
        return app.parse_flags_with_usage(argv)
    except AttributeError as e:
        text = str(e).strip("\"'").replace("\\n", "\n").replace("\\'", "'")
        key = text.splitlines()[0].strip("'\"")
        given = next((a for a in argv if a.startswith(f"--config.{key}")), f"--config.{key}")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        print(f"error: unknown config key {key!r} in {given}: the config file has no such key"
              + (f"; did you mean --config.{hint.group(1)}?" if hint else ""), file=sys.stderr)
        sys.exit(2)


def run(main, argv=None, legacy_flags: dict | None = None) -> None:
    """app.run(main) with one-line errors for unknown config keys, and the old spellings of
    renamed flags (`legacy_flags`: {"--old": "--new"}) still accepted."""
    argv = list(sys.argv if argv is None else argv)
    for old, new in (legacy_flags or {}).items():
        argv = [new + a[len(old):] if a == old or a.startswith(old + "=") else a for a in argv]
    app.run(main, argv=argv, flags_parser=_parse_flags)


def config_for(config_flag, source):
    """The config an evaluation of `source` uses: the --config file if given; else the config.json
    of the training workdir `source` belongs to (over the defaults, for keys added since); else
    the defaults. Command-line --config.KEY overrides apply in every case."""
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
