"""What the four command-line tools share: one flag convention, a --help that lists every flag,
and expected errors as one `error:` line with exit status 2 (anything else keeps its traceback)."""
import re

import pytest

from sttn_jax import cli, errors
from tests.conftest import run_cli

TOOLS = {
    "train.py": {"config", "workdir", "take_over_lock", "coordinator_address", "num_processes",
                 "process_id", "distributed", "compilation_cache_dir"},
    "eval.py": {"config", "checkpoint", "arch", "split", "step", "output", "coordinator_address",
                "num_processes", "process_id", "distributed", "compilation_cache_dir"},
    "merge.py": {"checkpoint", "out", "torch_out", "packed", "step", "batch", "image_size",
                 "seed", "plot", "compilation_cache_dir"},
    "sttn_jax.interop": {"arch", "checkpoint", "batch", "image_size", "seed", "inputs",
                         "reference_logits", "output", "compilation_cache_dir"},
}


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


def test_every_tool_lists_every_flag_in_its_help_with_underscores():
    for tool, wanted in TOOLS.items():
        r = run_cli(tool, "--help")
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr  # absl exits 1
        listed = set(re.findall(r"^\s+--(?:\[no\])?([a-z_]+):", r.stdout, re.M))
        assert wanted <= listed, (tool, wanted - listed)
        assert not any("-" in name for name in listed), (tool, listed)


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
