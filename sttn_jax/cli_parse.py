"""The command line as the tools parse it: every usage mistake one line `error: ...` with exit
status 2, before anything is imported or written; --help; the config file flag; output files."""
import difflib
import importlib.util
import os
import re
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

flags.disclaim_key_flags()  # the flags defined here belong to the tool: its --help lists them

FLAGS = flags.FLAGS


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
    """Refuses an unreadable config file, an override of a key it lacks or of the wrong type, before
    absl parses anything (ml_collections' own errors are not meant for users, some come late)."""
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


def define_config_flag(default: str | None, help_string: str, print_flag: bool = True) -> None:
    """--config (a config file; --config.KEY=VALUE overrides one key) and --print_config; a
    default file's overrides in sys.argv are checked first, so a mistake there is one line too."""
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
