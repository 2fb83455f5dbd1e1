"""What the five command-line tools share: one flag convention, a --help that lists every flag
(exit status 0), and every mistake and expected error as one `error:` line with exit status 2,
nothing written (anything else keeps its traceback)."""
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sttn_jax import cli, cli_parse, errors
from tests.conftest import REPO, assert_one_error_line, run_cli

TOOLS = {
    "train.py": {"config", "workdir", "take_over_lock", "coordinator_address", "num_processes",
                 "process_id", "distributed", "heartbeat_timeout_seconds", "compilation_cache_dir",
                 "print_config"},
    "eval.py": {"config", "checkpoint", "arch", "split", "step", "out", "coordinator_address",
                "num_processes", "process_id", "distributed", "heartbeat_timeout_seconds",
                "compilation_cache_dir", "print_config"},
    "merge.py": {"checkpoint", "out", "torch_out", "packed", "step", "batch", "image_size",
                 "seed", "plot", "compilation_cache_dir"},
    "sttn_jax.interop": {"arch", "checkpoint", "batch", "image_size", "seed", "inputs",
                         "reference_logits", "out", "compilation_cache_dir"},
    "sttn_jax.demo": {"config", "workdir", "compilation_cache_dir", "print_config"},
}
SMOKE = str(REPO / "configs" / "smoke.py")
TRAIN = ("train.py", "--config", SMOKE, "--workdir", "w")
EVAL = ("eval.py", "--checkpoint", "missing", "--out", "r.json")
MERGE = ("merge.py", "--checkpoint", "missing", "--out", "m", "--packed", "m.sttn")
DEMO = ("sttn_jax.demo", "--workdir", "d")
# Each usage mistake: (the command, run in an empty directory that must stay empty, and what its
# one error line says). Together they cover every tool and every kind of mistake.
MISTAKES = [
    (TRAIN + ("--config.batch_size=abc",), "config.batch_size takes an integer, not 'abc'"),
    (TRAIN + ("--config.learning_rate=abc",), "config.learning_rate takes a number"),
    (TRAIN + ("--config.fabricate_data=yes",), "config.fabricate_data takes True or False"),
    (TRAIN + ("--config.batch_size=12.5",), "e.g. --config.batch_size=8"),
    (TRAIN + ("--config.batch_sise=3",), "did you mean --config.batch_size?"),
    (TRAIN + ("--config.batch_size=-8",), "config.batch_size=-8"),  # a bad value: the library's
    (TRAIN + ("--workdri=x",), "unknown flag --workdri; did you mean --workdir?"),
    (TRAIN + ("--take_over_lock=maybe",), "--take_over_lock=maybe"),
    (TRAIN + ("extra",), "unexpected arguments: extra"),
    (("train.py", "--workdir", "w"), "--config is required"),
    (("train.py", "--config", SMOKE), "--workdir is required"),
    (("train.py", "--config.batch_size=8", "--workdir", "w"), "give --config FILE first"),
    (("train.py", "--config", "nothere.py", "--workdir", "w"), "nothere.py"),
    (EVAL + ("--config.batch_size=abc",), "config.batch_size takes an integer"),
    (EVAL + ("--config.nokey=1",), "unknown config key 'nokey'"),
    (EVAL + ("--arch=resnet99",), "--arch=resnet99"),
    (EVAL + ("--step=last",), "--step=last"),
    (EVAL + ("--output=r.json",), "unknown flag --output"),
    (("eval.py", "--out", "r.json"), "--checkpoint is required"),
    (EVAL, "missing: no such file or directory"),
    (("eval.py", "--checkpoint", "missing", "--out", "."), "--out . is a directory"),
    (("merge.py", "--checkpoint", "missing"), "--out is required"),
    (MERGE + ("--batch=abc",), "--batch=abc"),
    (MERGE + ("--torch-out=m.pth.tar",), "unknown flag --torch-out; did you mean --torch_out?"),
    (MERGE + ("--no-plot",), "unknown flag --no-plot"),
    (MERGE, "missing: no such file or directory"),
    (("sttn_jax.interop",), "give a command"),
    (("sttn_jax.interop", "convert", "a.pth"), "convert takes SRC.pth.tar DST arguments, got 1"),
    (("sttn_jax.interop", "parity", "--batch=abc"), "--batch=abc"),
    (("sttn_jax.interop", "parity", "--image-size=32"), "did you mean --image_size?"),
    (("sttn_jax.interop", "parity", "--out", "p.json"), "parity needs --checkpoint"),
    (DEMO + ("--config.batch_size=abc",), "config.batch_size takes an integer"),
    (DEMO + ("--config.nokey=1",), "unknown config key 'nokey'"),
    (DEMO + ("--workdri=x",), "did you mean --workdir?"),
    (DEMO + ("extra",), "unexpected arguments: extra"),
]


def _run_in(directory, command):
    script, *args = command
    started = time.monotonic()
    r = run_cli(script if "." in script and not script.endswith(".py") else str(REPO / script),
                *args, cwd=directory)
    return r, time.monotonic() - started


def test_every_usage_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path):
    """Each tool through the table of mistakes: a value of the wrong type, a missing or unknown
    flag, an unknown config key, a bad value, a stray argument, an unreadable or unwritable path.
    The subprocesses run side by side; most end before JAX or TensorFlow is imported."""
    dirs = [tmp_path / str(i) for i in range(len(MISTAKES))]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(_run_in, dirs, [command for command, _ in MISTAKES]))
    for d, (command, wanted), (r, seconds) in zip(dirs, MISTAKES, runs):
        line = assert_one_error_line(r)
        assert wanted in line, (command, line)
        assert sorted(p.name for p in d.iterdir()) == [], (command, "wrote something")
        print(f"{seconds:5.1f} s  {' '.join(command)}")


@pytest.mark.parametrize("error", errors.EXPECTED, ids=lambda c: c.__name__)
def test_each_expected_error_is_one_line_and_exit_2(error, capsys):
    """A message spanning lines (the not-prepared hint does) still prints as one `error:` line,
    the last on stderr, so scripts and people find the whole of it there."""
    exc = (error("path", "resnet18_ter", "resnet18_bwx2") if error is errors.ArchMismatchError
           else error("what is wrong\n  tfds build x --data_dir=d\n"))
    with pytest.raises(SystemExit) as exit_info:
        with cli.one_line_errors():
            raise exc
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    if error is not errors.ArchMismatchError:
        assert err.strip() == "error: what is wrong tfds build x --data_dir=d"


def test_an_unexpected_error_keeps_its_traceback(capsys):
    with pytest.raises(RuntimeError, match="a bug"):
        with cli.one_line_errors():
            raise RuntimeError("a bug")
    assert capsys.readouterr().err == ""


def test_every_tool_lists_every_flag_in_its_help_once_with_underscores():
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda tool: run_cli(tool, "--help"), TOOLS))
    for (tool, wanted), r in zip(TOOLS.items(), runs):
        assert r.returncode == 0 and r.stderr == "", (tool, r.stderr)
        listed = re.findall(r"^\s+--(?:\[no\])?([a-z_-]+):", r.stdout, re.M)
        assert wanted == set(listed), (tool, wanted ^ set(listed))
        assert len(listed) == len(set(listed)), (tool, listed)  # one spelling per flag
        assert not any("-" in name for name in listed), (tool, listed)
    eval_help = runs[list(TOOLS).index("eval.py")].stdout
    for kind in ("training workdir", "model checkpoint directory", "packed", ".pth.tar"):
        assert kind in eval_help, kind


def test_print_config_prints_every_key_after_the_overrides_and_exits_0():
    from configs import smoke

    r = run_cli("train.py", "--config", "configs/smoke.py", "--config.batch_size=16",
                "--print_config")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    wanted = json.loads(smoke.get_config().to_json_best_effort())
    assert printed == dict(wanted, batch_size=16)


def test_config_overrides_are_checked_against_the_config_not_upstream_text(capsys):
    """The check of --config.KEY overrides reads the config file itself, so it does not depend on
    how ml_collections words its refusal."""
    argv = ["x", "--config", "configs/smoke.py", "--config.eval_batch_sise=2"]
    with pytest.raises(SystemExit) as exit_info:
        cli_parse.check_config_overrides(argv, "config", SMOKE)
    assert exit_info.value.code == 2
    assert "did you mean --config.eval_batch_size?" in capsys.readouterr().err
    for good in ("--config.batch_size=4", "--config.fabricate_data", "--noconfig.fabricate_data",
                 "--config.learning_rate=1", "--config.dataset=x"):
        cli_parse.check_config_overrides(["x", good], "config", SMOKE)
    cli_parse.check_config_overrides(["x", "--config.batch_size", "4"], "config",
                               str(REPO / "configs" / "smoke.py"))


def test_compilation_cache_setting(monkeypatch, tmp_path):
    """--compilation_cache_dir: "auto" is off on a CPU and ~/.cache/sttn-jax/xla elsewhere, a
    directory is used on any backend, "" and "none" are off, and a cache JAX already has (from
    JAX_COMPILATION_CACHE_DIR, as in these tests) is left alone."""
    import jax

    given = jax.config.jax_compilation_cache_dir
    assert given  # tests/conftest.py sets one for the session
    assert cli.enable_compilation_cache(str(tmp_path / "other")) == given
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        for off in ("", "none"):
            assert cli.enable_compilation_cache(off) is None
        assert cli.enable_compilation_cache("auto") is None  # this machine's backend is the CPU
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        auto = str(tmp_path / ".cache" / "sttn-jax" / "xla")
        assert cli.enable_compilation_cache("auto") == auto == jax.config.jax_compilation_cache_dir
        jax.config.update("jax_compilation_cache_dir", None)
        assert cli.enable_compilation_cache("~/xla") == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", given)


def test_a_lost_peer_is_recognised_in_a_collective_and_in_its_setup(monkeypatch):
    """Gloo's errors when a peer is gone: in a collective under way, and while the processes meet
    for a program's first collectives (here, what a process saw of a peer held 45 s away)."""
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    lost = ["UNKNOWN: Gloo all-reduce failed: [external/gloo/pair.cc:589] Connection closed",
            "UNKNOWN: Gloo context initialization failed: [external/gloo/gloo/transport/tcp/"
            "pair.h:311] Connect timeout [none]"]
    assert all(cli._LostPeer().wants(jax.errors.JaxRuntimeError(m)) for m in lost)
    assert not cli._LostPeer().wants(jax.errors.JaxRuntimeError("INTERNAL: out of memory"))
    assert not cli._LostPeer().wants(RuntimeError(lost[0]))


def test_a_lost_peer_is_one_line_without_status_word_or_source_location(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    exc = RuntimeError("UNKNOWN: Gloo all-reduce failed: [external/gloo/pair.cc:589] Connection "
                       "closed by peer [127.0.0.1]:1234\nmore detail")
    cli._LostPeer().handle(exc)
    err = capsys.readouterr().err.strip()
    assert exits == [1] and "\n" not in err
    assert err.startswith("error: lost contact with another process (in a collective: Gloo "
                          "all-reduce failed: Connection closed by peer [127.0.0.1]:1234); ")
