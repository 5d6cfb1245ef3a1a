"""Run an untrusted Python program in a sandbox: bubblewrap namespaces plus kernel resource limits.

What the program gets: a fresh mount namespace with the system's and the interpreter's files read-only, a writable
``/box`` (its working directory), ``/tmp`` and ``/dev/shm`` of at most ``disk_mb`` each (tmpfs; the rest of the tree
read-only), no ``/proc``, no network (its own, empty, network namespace), its own PID, IPC and UTS namespaces, an
empty environment but for ``PATH``/``HOME``, and nothing of the run's files. What it may use: ``cpu_s`` of CPU time
(``RLIMIT_CPU``), ``memory_mb`` of address space per process (``RLIMIT_AS``), ``output_kb`` per file it writes,
stdout and stderr included (``RLIMIT_FSIZE``: more is ``SIGXFSZ``), ``processes`` tasks of its user
(``RLIMIT_NPROC``; run as root, each sandbox slot is a user of its own, ``nobody`` and the ids below it), and ``wall_s``
of wall time, after which the whole namespace is killed. Its processes are the first the kernel's OOM killer takes
(``oom_score_adj`` 1000), never the inference engine beside it. So one sandbox holds at most
``processes * memory_mb`` of memory plus ``3 * disk_mb`` of files.

Every run goes through the slot's host process (``sandbox_host.py``): a child subreaper that reaps everything a run
left before its outcome is returned, so nothing of a run outlives it whatever the machine's PID 1 does, and that
starts from an empty environment, so no secret of the worker's is in any process of the sandbox.

A run ends in one ``Outcome``: ``ok`` / ``error`` (the program failed), ``exited_early`` / ``untrusted_value`` (the
call-based harness caught it ending before its tests or comparing a value that can lie: ``harness.py``), or a denial:
``timeout``, ``cpu_limit``, ``memory_limit``, ``output_limit``, ``disk_limit``, ``process_limit``, ``file_denied``,
``network_denied``. A sandbox that cannot *start* (bwrap refused a fork or a namespace, a binary is missing) is not
the program's failure: it is retried, and if it persists ``SandboxUnavailable`` is raised.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from r1.rewards import harness
from r1.rewards.rewrite import rewrite_tests
from r1.rewards.sandbox_host import read_message, write_message

log = logging.getLogger(__name__)

NOBODY = 65534
DENIALS = ("timeout", "cpu_limit", "memory_limit", "output_limit", "disk_limit", "process_limit", "file_denied",
           "network_denied")
START_ATTEMPTS = 3  # a sandbox that fails to start is tried this often in all, RETRY_DELAYS_S apart
RETRY_DELAYS_S = (0.5, 2.0)
_HOST = Path(__file__).with_name("sandbox_host.py")
_HARNESS = Path(harness.__file__)


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 512
    output_kb: int = 256
    processes: int = 16
    disk_mb: int = 64


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "error", "exited_early", "untrusted_value" or one of DENIALS
    returncode: int
    stdout: str
    stderr: str
    attempts: int = 1  # starts it took (more than 1: the sandbox failed to start before, and was retried)


class SandboxUnavailable(RuntimeError):
    """The sandbox itself failed to start ``attempts`` times in a row: no program ran, so there is no reward to
    give. A run must stop rather than train on rewards that say nothing about the programs."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(f"the code sandbox failed to start {attempts} times in a row: {reason}")
        self.reason, self.attempts = reason, attempts

    def __reduce__(self):  # (raised in a Ray actor, re-raised in the driver)
        return SandboxUnavailable, (self.reason, self.attempts)


class _StartFailed(Exception):
    pass


def bwrap_binary() -> str | None:
    return shutil.which("bwrap")


def _python() -> tuple[str, str]:
    """The interpreter the program runs on, and the directory to expose for it: the system's ``/usr/bin/python3``
    (under ``/usr``, readable by ``nobody``), else this Python's base installation (never the virtualenv: the
    program sees the standard library only)."""
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3", "/usr"
    prefix = sys.base_prefix
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (Path(prefix) / "bin" / version, Path(prefix) / "bin" / "python3"):
        if exe.exists():
            return str(exe), prefix
    raise RuntimeError(f"no Python interpreter under {prefix}")


def tasks_of(uid: int) -> int:
    """Tasks (processes and threads, zombies included) the user has now: RLIMIT_NPROC counts them all."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return count


class Sandbox:
    """One sandbox slot: runs programs one at a time, as user ``uid`` when this process is root (default
    ``nobody``), through a host process of its own. Not thread-safe: one slot per thread."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), uid: int | None = None):
        self.limits = limits
        self.as_root = os.geteuid() == 0
        self.uid = (NOBODY if uid is None else uid) if self.as_root else None
        self._host: subprocess.Popen | None = None

    # --- programs ------------------------------------------------------------------------------------------------
    def run(self, source: str, stdin: str = "") -> Outcome:
        """Run ``source`` as a script with ``stdin``."""
        return self._run(source, stdin, tests=None)

    def run_tests(self, source: str, tests: str) -> Outcome:
        """Run ``source``, then the call-based ``tests`` (asserts) in the same interpreter, through the harness:
        ``ok`` only if the last test returned."""
        return self._run(source, "", tests=tests)

    def _run(self, source: str, stdin: str, tests: str | None) -> Outcome:
        causes = []
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return self._attempt(source, stdin, tests, attempt)
            except _StartFailed as err:
                causes.append(str(err))
                log.warning("code sandbox (uid %s): start %d of %d failed: %s",
                            os.getuid() if self.uid is None else self.uid, attempt, START_ATTEMPTS, err)
                if attempt < START_ATTEMPTS:
                    time.sleep(RETRY_DELAYS_S[min(attempt - 1, len(RETRY_DELAYS_S) - 1)])
        raise SandboxUnavailable(causes[-1], START_ATTEMPTS)

    def _attempt(self, source: str, stdin: str, tests: str | None, attempt: int) -> Outcome:
        bwrap = bwrap_binary()
        if bwrap is None:
            raise _StartFailed("no `bwrap` on PATH: the code sandbox needs bubblewrap (`apt-get install bubblewrap`)")
        limits = self.limits
        nonce = secrets.token_hex(16) if tests is not None else None
        with tempfile.TemporaryDirectory(prefix="r1-box-") as host_dir:
            box = Path(host_dir)
            if self.as_root:
                os.chmod(box, 0o755)  # (read by the slot's user)
            (box / "main.py").write_text(source)
            (box / "stdin").write_text(f"{nonce}\n" if nonce else stdin)
            (box / "stdout").touch()
            (box / "stderr").touch()
            python, prefix = _python()
            if tests is None:
                binds, argv = [], [python, "-I", "-S", "/box/main.py"]
            else:
                (box / "tests.py").write_text(rewrite_tests(tests))
                binds = ["--ro-bind", str(_HARNESS), "/r1/harness.py", "--ro-bind", str(box / "tests.py"),
                         "/r1/tests.py"]
                argv = [python, "-I", "-S", "/r1/harness.py", "/box/main.py", "/r1/tests.py"]
            disk = str(limits.disk_mb * 2**20)
            command = [
                bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--json-status-fd", "3", "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/box", "--setenv", "PYTHONDONTWRITEBYTECODE",
                "1", "--ro-bind", "/usr", "/usr", "--ro-bind", "/bin", "/bin", "--ro-bind", "/lib", "/lib",
                "--ro-bind-try", "/lib64", "/lib64", *([] if prefix == "/usr" else ["--ro-bind", prefix, prefix]),
                "--dev", "/dev", "--size", disk, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
                "--size", disk, "--tmpfs", "/tmp", "--size", disk, "--tmpfs", "/box",
                "--ro-bind", str(box / "main.py"), "/box/main.py", *binds, "--remount-ro", "/", "--chdir", "/box",
                "--", *argv,
            ]
            nproc = limits.processes + (0 if self.as_root else tasks_of(os.getuid()))
            request = {
                "argv": command, "env": {}, "uid": self.uid, "gid": self.uid, "wall_s": limits.wall_s,
                "stdin": str(box / "stdin"), "stdout": str(box / "stdout"), "stderr": str(box / "stderr"),
                "rlimits": {"CPU": [limits.cpu_s, limits.cpu_s], "AS": [limits.memory_mb * 2**20] * 2,
                            "FSIZE": [limits.output_kb * 1024] * 2, "CORE": [0, 0], "NPROC": [nproc, nproc]},
                "oom_score_adj": 1000,
            }
            reply = self._ask(request)
            stdout = (box / "stdout").read_bytes()[: limits.output_kb * 1024].decode(errors="replace")
            stderr = (box / "stderr").read_bytes()[-8192:].decode(errors="replace")
        if reply["spawn_error"]:
            raise _StartFailed(f"starting bwrap{self._as()} failed: {reply['spawn_error']}{self._crowded()}")
        if reply["timed_out"] and '"child-pid"' not in reply["status"]:
            raise _StartFailed(f"bwrap did not create the sandbox's namespaces within wall_s={limits.wall_s} s")
        if not reply["timed_out"] and '"exit-code"' not in reply["status"]:  # bwrap ended before the program ran
            said = " ".join(line for line in stderr.splitlines() if line.startswith("bwrap:")) or stderr.strip()
            raise _StartFailed(f"bwrap{self._as()} could not set the sandbox up (exit status {reply['returncode']}): "
                               f"{said or 'no message'}{_hint(said)}{self._crowded()}")
        passed = True
        if nonce is not None:
            verdict = f"\nr1-verdict {nonce}\n"
            passed = verdict in stdout
            stdout = stdout.replace(verdict, "", 1)
        status = _status(reply["returncode"], stderr, reply["timed_out"], harnessed=nonce is not None,
                         passed=passed)
        return Outcome(status, reply["returncode"], stdout, stderr, attempt)

    def _as(self) -> str:
        return f" as uid {self.uid}" if self.uid is not None else ""

    def _crowded(self) -> str:
        if self.uid is None:
            return ""
        return f" (uid {self.uid} holds {tasks_of(self.uid)} tasks now; the process limit is {self.limits.processes})"

    # --- the host ------------------------------------------------------------------------------------------------
    def _ask(self, request: dict) -> dict:
        host = self._host_process()
        try:
            write_message(host.stdin.fileno(), request)
            reply = _read_with_timeout(host.stdout.fileno(), self.limits.wall_s + 60)
        except (OSError, TimeoutError) as err:
            self._stop_host()
            raise _StartFailed(f"the sandbox host process failed: {type(err).__name__}: {err}") from None
        if reply is None:
            code = self._stop_host()
            raise _StartFailed(f"the sandbox host process exited (status {code})")
        return reply

    def _host_process(self) -> subprocess.Popen:
        if self._host is None or self._host.poll() is not None:
            try:
                self._host = subprocess.Popen([sys.executable, "-I", "-S", str(_HOST)], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, env={}, cwd="/")
            except OSError as err:
                raise _StartFailed(f"starting the sandbox host process failed: {err}") from None
            hello = _read_with_timeout(self._host.stdout.fileno(), 60)
            if not hello or "ready" not in hello:
                self._stop_host()
                raise _StartFailed(f"the sandbox host process did not start: {hello}")
        return self._host

    def _stop_host(self) -> int | None:
        host, self._host = self._host, None
        if host is None:
            return None
        if host.poll() is None:
            host.kill()
        return host.wait()

    def close(self) -> None:
        host, self._host = self._host, None
        if host is not None:
            host.stdin.close()  # EOF: it exits (a run in progress is killed and reaped first)
            try:
                host.wait(timeout=self.limits.wall_s + 10)
            except subprocess.TimeoutExpired:
                host.kill()
                host.wait()
            host.stdout.close()

    def __enter__(self) -> Sandbox:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_with_timeout(fd: int, timeout_s: float) -> dict | None:
    import select

    ready, _, _ = select.select([fd], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"no reply within {timeout_s:.0f} s")
    return read_message(fd)


def _hint(said: str) -> str:
    if "namespace" in said or "Operation not permitted" in said or "uid map" in said:
        return (" -- user namespaces are refused here: on Kubernetes the pod's seccomp profile (RuntimeDefault "
                "forbids them) or AppArmor; see docs/code_rewards.md, 'Where it runs'")
    return ""


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               uid: int | None = None) -> Outcome:
    """One program in a sandbox of its own (a fresh host); as root, as user ``uid`` (default ``nobody``)."""
    with Sandbox(limits, uid) as box:
        return box.run(source, stdin)


def _status(returncode: int, stderr: str, timed_out: bool, harnessed: bool = False, passed: bool = True) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok" if passed else "exited_early"  # (exit 0 without the harness's verdict: os._exit mid-test)
    if returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL) and "MemoryError" not in stderr:
        return "cpu_limit"  # (the kernel sends SIGXCPU at the soft limit, SIGKILL at the hard one)
    if returncode == 128 + signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if "No space left on device" in stderr:
        return "disk_limit"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "MemoryError" in last or "Cannot allocate memory" in stderr:
        return "memory_limit"
    if "[Errno 11] Resource temporarily unavailable" in stderr:  # fork/thread creation at RLIMIT_NPROC (the
        return "process_limit"  # children's tracebacks interleave: anywhere in stderr)
    if harnessed and returncode == harness.EXITED_EARLY:
        return "exited_early"
    if harnessed and returncode == harness.UNTRUSTED_VALUE:
        return "untrusted_value"
    if re.match(r"(FileNotFoundError|PermissionError|IsADirectoryError|OSError: \[Errno 30\])", last):
        return "file_denied"
    if "Network is unreachable" in last or "Temporary failure in name resolution" in last or \
            last.startswith(("ConnectionRefusedError", "socket.gaierror")):
        return "network_denied"
    return "error"
