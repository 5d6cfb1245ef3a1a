"""The code sandbox (r1/rewards/sandbox.py) against programs that misbehave in every way the issue names: each ends
in the expected outcome within its limits, and nothing of it outlives the run. Real bubblewrap, real rlimits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from r1.rewards import sandbox
from r1.rewards.code import CodeVerifier
from r1.rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, run_python
from r1.types import CodeTest
from tests.conftest import REPO
from tests.sandbox_burst import SECRET_VARIABLE, leftover
from tests.sandbox_burst import SNOOP as SNOOP_ONCE
from tests.seccomp_exec import library as seccomp_library

LIMITS = SandboxLimits(cpu_s=1, wall_s=8, memory_mb=256, output_kb=64, processes=16, disk_mb=4)  # (wall >> cpu)
UID = 64000  # this module's sandbox user (the other modules' run beside it under -n 2: their users are others)


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
    ("for i in range(10**6):\n    open(f'/tmp/{i}', 'wb').write(b'x' * 60000)", "disk_limit", ""),  # GBs to /tmp
    ("for i in range(10**6):\n    open(f'/box/{i}', 'wb').write(b'x' * 60000)", "disk_limit", ""),
    ("open('/x', 'w').write('x')", "file_denied", ""),  # the rest of the tree is read-only
    ("open('/dev/x', 'w').write('x')", "file_denied", ""),
], ids=["correct", "crash", "spin", "sleep", "fork-bomb", "memory", "huge-output", "run-files", "etc", "socket", "dns",
        "disk-tmp", "disk-box", "root-fs", "dev"])
def test_each_misbehaviour_ends_in_its_outcome_within_its_limits(source, status, out):
    outcome = run_python(source, "21\n", LIMITS, uid=UID)
    assert outcome.status == status, outcome  # (a spin or a sleep ends as "timeout": the wall limit ended it)
    if out is not None:
        assert outcome.stdout == out
    else:
        assert 0 < len(outcome.stdout) <= LIMITS.output_kb * 1024
    if os.geteuid() == 0:  # nothing of it outlives the run, not even a zombie (the fork bomb's children included)
        assert leftover({UID}) == []


def test_a_program_reaches_no_host_endpoint_that_the_same_program_outside_the_sandbox_reaches():
    """The socket and DNS cases above end ``network_denied`` on any offline host, sandbox or not. Here the host
    listens itself - TCP and UDP (DNS's transport) on its loopback - so the same program, run outside the
    sandbox, does reach it (the reference); inside, nothing arrives."""
    import socket

    tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    udp.bind(("127.0.0.1", 0))
    tcp.settimeout(0.5)
    udp.settimeout(0.5)
    program = (f"import socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
               f"u.sendto(b'query', ('127.0.0.1', {udp.getsockname()[1]}))\n"
               f"socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=2).sendall(b'hello')\n"
               "print('connected')\n")

    def arrived() -> tuple[int, int]:
        got_tcp = got_udp = 0
        for sock, kind in ((tcp, "tcp"), (udp, "udp")):
            try:
                if kind == "tcp":
                    sock.accept()[0].close()
                    got_tcp += 1
                else:
                    sock.recvfrom(64)
                    got_udp += 1
            except TimeoutError:
                pass
        return got_tcp, got_udp

    try:
        outside = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30,
                                 check=False)
        assert outside.stdout == "connected\n" and arrived() == (1, 1), outside.stderr  # the host's network works
        inside = run_python(program, "", LIMITS, uid=UID)
        assert inside.status == "network_denied" and "connected" not in inside.stdout, inside
        assert arrived() == (0, 0)
    finally:
        tcp.close()
        udp.close()


def test_the_program_sees_an_empty_writable_box_and_a_clean_environment():
    source = ("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd(), sorted(os.listdir('.')), "
              "sorted(k for k in os.environ if k not in ('PWD', 'LC_CTYPE')))")  # (LC_CTYPE: Python's own, PEP 538)
    outcome = run_python(source, "", LIMITS, uid=UID)
    assert outcome.status == "ok", outcome
    assert outcome.stdout.strip() == "/box ['main.py', 'scratch.txt'] ['HOME', 'PATH', 'PYTHONDONTWRITEBYTECODE']"


SECRET = "r1-planted-secret-7f3a9c"
SNOOP = SNOOP_ONCE + "import time\ntime.sleep(2)\n"


def test_no_secret_of_the_worker_reaches_any_process_of_the_sandbox(monkeypatch):
    """A variable in the worker's environment (an API key) is in no process of the sandbox: not the program's
    environment, not bubblewrap's own init (PID 1 inside, whose /proc/1/environ leaked it), not the host's. Read from
    inside, and from outside while the program runs."""
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)
    box = Sandbox(LIMITS, uid=UID)
    seen_outside = []

    def snoop_outside():  # every process of the sandbox's user, and the host, while the program sleeps
        time.sleep(1.0)
        pids = [p for p in os.listdir("/proc") if p.isdigit() and _owner(p) == UID] + [str(box._host.pid)]
        for pid in pids:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    seen_outside.append((pid, f.read()))
            except OSError:
                pass

    try:
        box._host_process()
        watcher = threading.Thread(target=snoop_outside)
        watcher.start()
        outcome = box.run(SNOOP)
        watcher.join()
    finally:
        box.close()
    assert outcome.status == "ok", outcome
    assert SECRET not in outcome.stdout + outcome.stderr
    assert outcome.stdout.strip().endswith("False")  # no /proc in the sandbox at all
    assert len(seen_outside) >= 3  # the host, bwrap's monitor, the namespace's init, the program
    assert all(SECRET.encode() not in env for _, env in seen_outside), seen_outside
    assert os.environ[SECRET_VARIABLE] == SECRET  # (planted where the sandbox was started)


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="counts the processes of the sandbox's own user (run as root)")
def test_a_daemon_the_program_leaves_behind_is_gone_when_the_outcome_returns():
    """A program that double-forks a session leader and exits: the outcome comes back, and by then nothing of the
    sandbox exists, not even a zombie, whatever the machine's PID 1 does."""
    source = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        time.sleep(60)\n    os._exit(0)\nprint('parent done')")
    with Sandbox(LIMITS, uid=UID) as box:
        outcome = box.run(source)
        assert outcome.status == "ok" and outcome.stdout == "parent done\n", outcome
        assert leftover({UID}) == []


HOLDER_UID = 64100


@pytest.mark.skipif(os.geteuid() != 0, reason="holds processes as another user (run as root)")
def test_a_sandbox_that_cannot_start_is_retried_then_unavailable_naming_the_cause(monkeypatch):
    """The slot's user already holds its whole process limit (here: processes the test holds): bwrap cannot even
    start. That is not the program's failure: retried, then SandboxUnavailable naming the cause, counted as
    infra_error -- never a reward of 0. Released, the same slot runs programs again."""
    monkeypatch.setattr(sandbox, "RETRY_DELAYS_S", (0.05,))
    limits = SandboxLimits(cpu_s=1, wall_s=8, memory_mb=256, output_kb=64, processes=4)
    holders = [subprocess.Popen(["sleep", "60"], user=HOLDER_UID, group=HOLDER_UID) for _ in range(4)]
    verifier = CodeVerifier(limits, parallel=1, uid_base=HOLDER_UID)
    try:
        with pytest.raises(SandboxUnavailable) as caught:
            verifier.passes_many([("print(int(input()) * 2)", (CodeTest(stdin="1\n", stdout="2\n"),))])
        assert caught.value.attempts == sandbox.START_ATTEMPTS == 3
        assert "Resource temporarily unavailable" in caught.value.reason
        assert f"uid {HOLDER_UID} holds 4 tasks now; the process limit is 4" in caught.value.reason
        assert dict(verifier.stats) == {"programs": 1, "infra_retries": 2, "infra_error": 1}
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    try:
        assert verifier.passes_many([("print(int(input()) * 2)", (CodeTest(stdin="1\n", stdout="2\n"),))]) == [True]
    finally:
        verifier.close()


def test_a_missing_bubblewrap_is_the_sandboxs_failure_not_the_programs(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "RETRY_DELAYS_S", (0.01,))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match=r"no `bwrap` on PATH.*apt-get install bubblewrap"):
        run_python("print(1)", "", LIMITS, uid=UID)


NON_ROOT = 1000


def as_user(uid: int, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``uid`` (and its group), in the repository. The interpreter and the checkout may lie under a
    directory only root may enter (pyenv under /root here): in a mount namespace of its own, such a directory is
    covered by an empty tmpfs and only the needed paths are bound back, so the user sees exactly those."""
    blocked: dict[str, set[str]] = {}
    for needed in (os.path.realpath(sys.executable), str(REPO)):
        parts = needed.split("/")
        for i in range(2, len(parts)):
            parent = "/".join(parts[:i])
            if not os.stat(parent).st_mode & 0o001:
                blocked.setdefault(parent, set()).add("/".join(parts[: i + 1]))
                break
    script = ["set -e", "mount --make-rprivate /"]
    for n, (parent, children) in enumerate(sorted(blocked.items())):
        for m, child in enumerate(sorted(children)):
            script += [f"mkdir -p /tmp/.r1-expose-{os.getpid()}-{n}-{m}",
                       f"mount --bind {child} /tmp/.r1-expose-{os.getpid()}-{n}-{m}"]
        script.append(f"mount -t tmpfs -o mode=755 r1-cover {parent}")
        for m, child in enumerate(sorted(children)):
            script += [f"mkdir -p {child}", f"mount --move /tmp/.r1-expose-{os.getpid()}-{n}-{m} {child}"]
    script.append(f'exec setpriv --reuid={uid} --regid={uid} --clear-groups -- "$@"')
    return subprocess.run(["unshare", "--mount", "--", "sh", "-c", "\n".join(script), "sh", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False, env=env)


CHART_PROFILE = REPO / "helm" / "r1" / "files" / "seccomp" / "r1-code-sandbox.json"
RUNTIME_DEFAULT = REPO / "tests" / "data" / "seccomp-runtime-default-namespaces.json"
as_non_root_under_seccomp = pytest.mark.skipif(
    os.geteuid() != 0 or seccomp_library() is None,
    reason="starts the verifier as another, non-root, user (needs root) under a seccomp profile (needs "
           "libseccomp.so.2: Debian's libseccomp2)")


@as_non_root_under_seccomp
def test_the_sandbox_runs_as_a_non_root_user_under_the_charts_seccomp_profile():
    """The chart's pods run as uid 1000 under a seccomp profile: the verifier as that user (no setuid: bubblewrap
    through unprivileged user namespaces) under the profile the chart ships for the pods where programs run
    (helm/r1/files/seccomp/r1-code-sandbox.json), on a burst of every kind of program, with a secret in its
    environment."""
    out = as_user(NON_ROOT, [sys.executable, "-m", "tests.seccomp_exec", str(CHART_PROFILE),
                             sys.executable, "-m", "tests.sandbox_burst", "0", "60"],
                  {"HOME": "/tmp", "PATH": os.environ["PATH"], SECRET_VARIABLE: SECRET})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["uid"] == NON_ROOT
    assert result["verdicts"] == result["expected"]
    stats = dict(result["stats"])
    stats.pop("infra_retries", None)  # (one user for every slot: a fork bomb may crowd a sibling's start, retried)
    assert stats == result["expected_stats"]
    assert result["snooped"] == {"status": "ok", "secret_seen": False}  # (the program runs as the worker's user)


@as_non_root_under_seccomp
def test_under_runtime_default_the_sandbox_is_unavailable_and_says_why():
    """RuntimeDefault (what the chart's training pods keep) forbids the namespaces: no program can run, and the
    error names the cause and where the fix is -- the start-up check stops a run with it before anything starts."""
    script = ("from r1.inputs import check_sandbox\ntry:\n    check_sandbox()\nexcept RuntimeError as err:\n"
              "    print(err)\nelse:\n    print('ran')")
    out = as_user(NON_ROOT, [sys.executable, "-m", "tests.seccomp_exec", str(RUNTIME_DEFAULT), sys.executable,
                             "-c", script], {"HOME": "/tmp", "PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout.strip()
    assert said.startswith("the data has coding problems (a `tests` field), and the code sandbox failed to start "
                           "3 times in a row: bwrap could not set the sandbox up"), said
    assert "bwrap: No permissions to create" in said  # (bubblewrap's words: "creating" upstream, Debian's "create")
    assert "on Kubernetes the pod's seccomp profile (RuntimeDefault forbids them)" in said
