"""Under CI (the CI environment variable set, as CI services set it), a skipped test is a failed
one unless its reason is declared in ALLOWED_SKIPS: a missing test dependency (torch, triton,
tensorflow, tensorflow-datasets, the CUDA lowering packages) then turns the run red instead of
leaving it green with the tests that need it gone. Skips of whole modules (a module-level
`pytest.importorskip`) surface as collection reports and are failed the same way.

tests/conftest.py imports these hooks; tests/test_ci_skips.py runs them on a tiny test file."""
import os

import pytest

# The skips CI accepts, reason -> why: only tests that need hardware CI machines lack.
ALLOWED_SKIPS = {
    "needs a CUDA GPU": "runs a kernel on a real GPU; the CPU tests lower and compile it for one",
}


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(report) -> str:
    """The reason given to pytest.skip/skipif/importorskip, as the report carries it."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # (path, line, "Skipped: reason")
        return longrepr[2].removeprefix("Skipped: ")
    return str(getattr(longrepr, "longrepr", longrepr) or "")


def fail_undeclared_skip(report) -> None:
    if not (report.skipped and under_ci() and not hasattr(report, "wasxfail")):
        return
    reason = skip_reason(report)
    if reason in ALLOWED_SKIPS:
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI ({reason!r}), which accepts only the skips in "
                       f"tests/ci_skips.py's ALLOWED_SKIPS: install what the test needs")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    fail_undeclared_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    fail_undeclared_skip(report)
    return report
