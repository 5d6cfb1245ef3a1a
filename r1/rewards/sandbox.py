"""Run an untrusted Python program in a sandbox: bubblewrap namespaces plus kernel resource limits.

What the program gets: a fresh mount namespace with the system's and the interpreter's files read-only, an empty
writable ``/box`` (its working directory) and ``/tmp``, no network (its own, empty, network namespace), its own PID,
IPC and UTS namespaces, a clean environment, and nothing of the run's files. What it may use: ``cpu_s`` of CPU time
(``RLIMIT_CPU``), ``memory_mb`` of address space (``RLIMIT_AS``), ``output_kb`` per file it writes, stdout and stderr
included (``RLIMIT_FSIZE``: more is ``SIGXFSZ``), ``processes`` more tasks than its user already has
(``RLIMIT_NPROC``; run as root, the sandbox drops to ``nobody`` first so the limit holds), and ``wall_s`` of wall time,
after which the whole namespace is killed. ``bwrap`` comes from Debian's ``bubblewrap`` package, ``prlimit`` from
util-linux.

Every run ends in one ``Outcome``: ``ok`` / ``error`` (the program failed), or a denial counted by kind:
``timeout``, ``cpu_limit``, ``memory_limit``, ``output_limit``, ``process_limit``, ``file_denied``, ``network_denied``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
DENIALS = ("timeout", "cpu_limit", "memory_limit", "output_limit", "process_limit", "file_denied", "network_denied")


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 512
    output_kb: int = 256
    processes: int = 16


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "error" or one of DENIALS
    returncode: int
    stdout: str
    stderr: str


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


def _tasks_of(uid: int) -> int:
    """Tasks (processes and threads) the user has now: RLIMIT_NPROC counts them all."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return count


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               uid: int | None = None) -> Outcome:
    """Run ``source`` with ``stdin``; as root, as user ``uid`` (default ``nobody``; its group is ``nogroup``)."""
    bwrap = bwrap_binary()
    if bwrap is None:
        raise RuntimeError("the code sandbox needs bubblewrap (`apt-get install bubblewrap`): no `bwrap` on PATH")
    python, prefix = _python()
    with tempfile.TemporaryDirectory(prefix="r1-box-") as host:
        program = Path(host) / "main.py"
        program.write_text(source)
        as_root = os.geteuid() == 0
        if as_root:
            os.chmod(host, 0o755)  # (read by nobody)
        out_path, err_path = Path(host) / "stdout", Path(host) / "stderr"
        cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
               "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/box", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
               "--ro-bind", "/usr", "/usr", "--ro-bind", "/bin", "/bin", "--ro-bind", "/lib", "/lib",
               "--ro-bind-try", "/lib64", "/lib64", *([] if prefix == "/usr" else ["--ro-bind", prefix, prefix]),
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/box",
               "--ro-bind", str(program), "/box/main.py", "--chdir", "/box",
               "--", python, "-I", "-S", "/box/main.py"]
        nproc = limits.processes + (0 if as_root else _tasks_of(os.getuid()))
        # util-linux's prlimit sets the limits in the child before it executes bwrap (no Python between fork and
        # exec: a rollout worker is threaded); dropping to nobody is subprocess's own (C) setuid
        confine = ["prlimit", f"--cpu={limits.cpu_s}", f"--as={limits.memory_mb * 2**20}",
                   f"--fsize={limits.output_kb * 1024}", "--core=0", f"--nproc={nproc}", "--"]
        as_nobody = {"user": NOBODY if uid is None else uid, "group": NOBODY, "extra_groups": []} if as_root else {}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([*confine, *cmd], stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, **as_nobody)
            try:
                proc.communicate(stdin.encode(), timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap and the namespace's init: everything in it dies
                proc.wait()
                timed_out = True
        stdout = out_path.read_bytes()[: limits.output_kb * 1024].decode(errors="replace")
        stderr = err_path.read_bytes()[-8192:].decode(errors="replace")
    return Outcome(_status(proc.returncode, stderr, timed_out), proc.returncode, stdout, stderr)


def _status(returncode: int, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL) and \
            "MemoryError" not in stderr:
        return "cpu_limit"  # (the kernel sends SIGXCPU at the soft limit, SIGKILL at the hard one)
    if returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "File too large" in stderr:
        return "output_limit"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "MemoryError" in last or "Cannot allocate memory" in stderr:
        return "memory_limit"
    if "[Errno 11] Resource temporarily unavailable" in stderr:  # fork/thread creation at RLIMIT_NPROC (the
        return "process_limit"  # children's tracebacks interleave: anywhere in stderr)
    if last.startswith(("FileNotFoundError", "PermissionError", "IsADirectoryError")):
        return "file_denied"
    if "Network is unreachable" in last or "Temporary failure in name resolution" in last or \
            last.startswith(("ConnectionRefusedError", "socket.gaierror")):
        return "network_denied"
    return "error"
