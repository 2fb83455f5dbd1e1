"""The Makefile's install: a Python that the pinned versions do not install on is refused in one
line naming the fix, before anything is created (pip's own message would be a page of resolver
output about TensorFlow)."""
import subprocess
import sys

import pytest

from tests.conftest import REPO


def supported_pythons() -> list[str]:
    """The Makefile's SUPPORTED_PYTHONS, as make expands it."""
    make = subprocess.run(["make", "-C", str(REPO), "-s", "--eval",
                           "print-supported: ; @echo $(SUPPORTED_PYTHONS)", "print-supported"],
                          capture_output=True, text=True, timeout=60, check=True)
    return make.stdout.split()


@pytest.mark.parametrize("version", ["3.14", "3.10"])
@pytest.mark.parametrize("target", ["demo", "install-test"])
def test_an_unsupported_python_is_refused_in_one_line_before_the_venv(tmp_path, version, target):
    python = tmp_path / f"python{version}"  # answers the Makefile's version question only
    python.write_text(f"#!/bin/sh\ncase \"$2\" in *version_info*) echo {version}; exit 0;; esac\n"
                      "echo 'not a Python' >&2; exit 1\n")
    python.chmod(0o755)
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-C", str(REPO), target, f"VENV={venv}", f"PYTHON={python}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    supported = supported_pythons()
    assert version not in supported
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {python} is Python {version}; the versions constraints.txt pins "
                      f"install on Python {' '.join(supported)} only: install one and run "
                      f"make {target} PYTHON=python{supported[-1]}"], proc.stderr
    assert not venv.exists()


def test_the_python_running_the_tests_is_one_the_makefile_accepts():
    assert "%d.%d" % sys.version_info[:2] in supported_pythons()


def test_the_package_version_is_pyprojects():
    """`sttn_jax.__version__` comes from the installed metadata, which pyproject.toml sets."""
    import tomllib

    import sttn_jax

    with open(REPO / "pyproject.toml", "rb") as f:
        assert sttn_jax.__version__ == tomllib.load(f)["project"]["version"]
