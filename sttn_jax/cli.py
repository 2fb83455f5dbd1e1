"""What the command-line tools share: absl flags for multi-host start-up, XLA's persistent
compilation cache, one logging path (absl logging: --verbosity, and a log file in the workdir; the
native libraries' log lines only at --verbosity >= 1), the config file flag (--config,
--config.KEY=VALUE, --print_config), and every usage mistake and expected error as one line
`error: ...` on stderr with exit status 2, refused before anything is imported or written where
that can be known. Flags are spelled with underscores, once each, and listed by each tool's --help
(exit status 0)."""
import contextlib
import difflib
import importlib.util
import logging as std_logging
import os
import re
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

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


def usage_error(message: str) -> None:
    """A mistake on the command line: one `error:` line and exit status 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(2)


HELP_FLAGS = ("help", "helpshort", "helpfull", "?", "h")
_TYPE_WORDS = {bool: "True or False", int: "an integer", float: "a number"}
_TYPE_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser()}


CONFIG_FLAGS = []  # the names of the config-file flags (define_config_flag)


def _config_flag_names() -> list[str]:
    return [name for name in CONFIG_FLAGS if name in FLAGS]


def _read_config_file(spec: str):
    """The ConfigDict of a config file ("path" or "path:argument", as ml_collections reads it)."""
    path, _, argument = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_sttn_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def _config_file_in(argv, name: str) -> str | None:
    """The value given to --NAME in argv (--NAME=FILE or --NAME FILE), or None."""
    for i, arg in enumerate(argv):
        if re.fullmatch(rf"--?{name}", arg) and i + 1 < len(argv):
            return argv[i + 1]
        if re.match(rf"--?{name}=", arg):
            return arg.split("=", 1)[1]
    return None


def _keys(config, prefix="") -> list[str]:
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if isinstance(value, ConfigDict):
            out += _keys(value, f"{prefix}{key}.")
    return out


def _lookup(config, key: str):
    """(found, value) of the dotted `key` in `config`."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_config_overrides(argv, name: str, config_file: str) -> None:
    """Refuses a config file that cannot be read, a `--NAME.KEY` override of a key the file lacks
    (with the closest key) and a value of the wrong type, before absl parses anything. Checked here
    rather than read from ml_collections' errors: those are an AttributeError, or an error raised
    only when the config is first used, neither meant for users."""
    try:
        config = _read_config_file(config_file)
    except Exception as e:  # noqa: BLE001 - any failure of the file becomes one line
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        usage_error(f"--{name} {config_file}: cannot read this config file ({detail}); give a "
                    "config file such as those in configs/")
    overrides = [(i, arg) for i, arg in enumerate(argv) if re.match(rf"--?(no)?{name}\.", arg)]
    for i, arg in overrides:
        spelled, _, value = arg.partition("=")
        key = spelled.split(".", 1)[1]
        found, current = _lookup(config, key)
        if not found:
            close = difflib.get_close_matches(key, _keys(config), n=1)
            hint = f"; did you mean --{name}.{close[0]}?" if close else ""
            listing = " (--print_config lists them)" if "print_config" in FLAGS else ""
            usage_error(f"unknown config key {key!r} in {arg}: {config_file} has no such key"
                        f"{hint}{listing}")
        kind = type(current)
        if kind not in _TYPE_PARSERS:
            continue
        if not value and "=" not in arg:
            if kind is bool or re.match(rf"--?no{name}\.", arg):
                continue
            value = argv[i + 1] if i + 1 < len(argv) else ""
        try:
            _TYPE_PARSERS[kind].parse(value)
        except (ValueError, TypeError):
            usage_error(f"{name}.{key} takes {_TYPE_WORDS[kind]}, not {value!r} (given as {arg}); "
                        f"e.g. --{name}.{key}={current}")


def _parse_flags(argv, required=()):
    """absl's parsing, every mistake as one `error:` line with exit status 2, --help exit 0."""
    given = [a.lstrip("-").split("=")[0] for a in argv[1:] if a.startswith("-")]
    if (asked := [a for a in given if a in HELP_FLAGS]):
        app.usage(shorthelp=asked[0] != "helpfull", writeto_stdout=True, exitcode=0)
    for name in _config_flag_names():
        if (config_file := _config_file_in(argv, name)) is not None:
            check_config_overrides(argv, name, config_file)
    try:
        rest = FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        config_name = next((n for n in _config_flag_names() if e.flagname.startswith(n + ".")), None)
        if config_name:
            usage_error(f"--{e.flagname} overrides a key of --{config_name}: give --{config_name} "
                        "FILE first")
        close = difflib.get_close_matches(e.flagname, list(FLAGS), n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        usage_error(f"unknown flag --{e.flagname}{hint} (--help lists the flags)")
    except flags.Error as e:
        usage_error(f"{e} (--help lists the flags and their values)")
    printing = "print_config" in FLAGS and FLAGS.print_config
    for name in required:
        if FLAGS[name].value is None and not (printing and name not in CONFIG_FLAGS):
            usage_error(f"--{name} is required: {FLAGS[name].help} (--help lists the flags)")
    return rest


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


def define_config_flag(default: str | None, help_string: str, print_flag: bool = True) -> None:
    """--config (a config file; --config.KEY=VALUE overrides one key) and --print_config. A
    default file is read while the flag is defined, with the overrides of sys.argv: they are
    checked first, so that a mistake there is one line too."""
    if print_flag:
        flags.DEFINE_bool("print_config", False, "Print the effective config (every key, after "
                          "the --config.KEY overrides) as JSON and exit.")
    if default is not None and _config_file_in(sys.argv, "config") is None:
        check_config_overrides(sys.argv, "config", default)
    config_flags.DEFINE_config_file("config", default, help_string)
    CONFIG_FLAGS.append("config")


def check_output_file(path, flag: str) -> None:
    """Refuses, before any work, an output file --FLAG cannot be written to."""
    if path is None:
        return
    target = Path(path).absolute()
    if target.is_dir():
        usage_error(f"--{flag} {path} is a directory; give a file name")
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        usage_error(f"--{flag} {path} cannot be written ({parent} is not a writable directory); "
                    "pick another place")


def print_config(config) -> None:
    print(config.to_json_best_effort(indent=2, sort_keys=True))


def run(main, argv=None, required=()) -> None:
    """app.run(main) with one-line usage errors; `required` names the flags a run needs."""
    argv = list(sys.argv if argv is None else argv)
    app.run(main, argv=argv, flags_parser=lambda args: _parse_flags(args, required))


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
