"""`train.py` (or another tool-like script) in a subprocess, for the tests that kill, preempt or
distribute it."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class TrainProcess:
    """`python SCRIPT ARGS` in a subprocess (train.py by default), its log lines collected as
    they come."""

    def __init__(self, args, env=None, script="train.py"):
        self.proc = subprocess.Popen([sys.executable, script, *args], cwd=REPO, text=True,
                                     env=env or dict(os.environ), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self, n=30) -> str:
        return "".join(self.lines[-n:])

    def wait_for_line(self, text, timeout=300):
        """Blocks until a log line contains `text`; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}:\n{self.log()}"
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.log()}")

    def signal(self, sig):
        self.proc.send_signal(sig)
        return self.finish()

    def finish(self, timeout=300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=60)  # every line read before a test looks at them
        return rc
