"""tests/ci_skips.py: under CI a skip fails unless declared, whether a test skips itself or a whole
module is skipped by `pytest.importorskip`; outside CI skips stay skips."""
import os
import subprocess
import sys

import pytest

from tests.ci_skips import ALLOWED_SKIPS
from tests.conftest import REPO

DECLARED = next(iter(ALLOWED_SKIPS))

TESTS = f"""
import pytest

def test_passes():
    pass

def test_skips_itself():
    pytest.skip("a dependency is missing")

@pytest.mark.skipif(True, reason={DECLARED!r})
def test_declared_skip():
    pass

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
"""

SKIPPED_MODULE = """
import pytest

pytest.importorskip("a_module_nobody_installs")

def test_never_collected():
    pass
"""


def pytest_on(tmp_path, ci, *args):
    """A pytest run in a subprocess, in tmp_path (so tests/conftest.py is not loaded), with only
    the hooks under test as a plugin."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.ci_skips", "-p", "no:xdist",
                           "-p", "no:randomly", "-p", "no:cacheprovider", "-rA", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_an_undeclared_skip_fails(tmp_path, ci):
    (tmp_path / "test_a.py").write_text(TESTS)
    r = pytest_on(tmp_path, ci, "test_a.py")
    assert r.returncode == 1, r.stdout
    assert "FAILED test_a.py::test_skips_itself" in r.stdout
    assert "skipped under CI ('a dependency is missing')" in r.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in r.stdout, r.stdout
    assert "SKIPPED [1] test_a.py" in r.stdout and DECLARED in r.stdout


def test_under_ci_a_module_skipped_by_importorskip_fails(tmp_path):
    (tmp_path / "test_b.py").write_text(SKIPPED_MODULE)
    r = pytest_on(tmp_path, "true", "test_b.py")
    assert r.returncode == 2, r.stdout  # interrupted: a collection error
    assert "ERROR test_b.py" in r.stdout and "a_module_nobody_installs" in r.stdout, r.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_skips_stay_skips(tmp_path, ci):
    (tmp_path / "test_a.py").write_text(TESTS)
    (tmp_path / "test_b.py").write_text(SKIPPED_MODULE)
    r = pytest_on(tmp_path, ci)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 3 skipped, 1 xfailed" in r.stdout, r.stdout
