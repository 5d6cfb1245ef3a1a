"""The code sandbox (r1/rewards/sandbox.py) against programs that misbehave in every way the issue names: each ends
in the expected outcome within its limits, and nothing of it outlives the run. Real bubblewrap, real rlimits."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from r1.rewards.sandbox import NOBODY, SandboxLimits, run_python
from tests.conftest import REPO

LIMITS = SandboxLimits(cpu_s=1, wall_s=8, memory_mb=256, output_kb=64, processes=16)  # (wall >> cpu: a busy CI)


pytestmark = pytest.mark.usefixtures("bwrap")  # (tests/conftest.py: installs bubblewrap where it can)


@pytest.mark.parametrize("source, status, out", [
    ("print(int(input()) * 2)", "ok", "42\n"),
    ("raise ValueError('wrong')", "error", ""),
    ("while True:\n    pass", "cpu_limit", ""),  # spins: killed at cpu_s
    ("import time\ntime.sleep(60)", "timeout", ""),  # sleeps: killed at wall_s
    ("import os\nwhile True:\n    os.fork()", "process_limit", ""),  # fork bomb: fork fails at the limit
    ("x = bytearray(2**30)", "memory_limit", ""),
    ("while True:\n    print('x' * 1000)", "output_limit", None),  # stopped at output_kb
    (f"print(open({str(REPO / 'README.md')!r}).read())", "file_denied", ""),  # the run's files are not there
    ("print(open('/etc/passwd').read())", "file_denied", ""),
    ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", "network_denied", ""),
    ("import socket\nsocket.getaddrinfo('pypi.org', 443)", "network_denied", ""),
], ids=["correct", "crash", "spin", "sleep", "fork-bomb", "memory", "huge-output", "run-files", "etc", "socket", "dns"])
def test_each_misbehaviour_ends_in_its_outcome_within_its_limits(source, status, out):
    started = time.monotonic()
    outcome = run_python(source, "21\n", LIMITS)
    took = time.monotonic() - started
    assert outcome.status == status, outcome
    if out is not None:
        assert outcome.stdout == out
    else:
        assert 0 < len(outcome.stdout) <= LIMITS.output_kb * 1024
    assert took < LIMITS.wall_s + 5  # never longer than its wall time (and bwrap's start/stop)
    if os.geteuid() == 0:  # nothing of it outlives the run (the fork bomb's children included); the kernel tears
        deadline = time.monotonic() + 5  # the PID namespace down a moment after its init died
        while (left := _sandboxed()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == []


def _sandboxed() -> list[dict]:
    """Live processes of the sandbox's user (``nobody``), zombies being reaped left aside."""
    return [p.info for p in psutil.process_iter(["pid", "uids", "status", "cmdline"])
            if p.info["uids"] and p.info["uids"].real == NOBODY and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_the_program_sees_an_empty_writable_box_and_a_clean_environment():
    source = ("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd(), sorted(os.listdir('.')), "
              "sorted(k for k in os.environ if k not in ('PWD', 'LC_CTYPE')))")  # (LC_CTYPE: Python's own, PEP 538)
    outcome = run_python(source, "", LIMITS)
    assert outcome.status == "ok", outcome
    assert outcome.stdout.strip() == "/box ['main.py', 'scratch.txt'] ['HOME', 'PATH', 'PYTHONDONTWRITEBYTECODE']"
