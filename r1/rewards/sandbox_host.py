"""The code sandbox's host: one long-lived process per sandbox slot that starts each run and reaps all it left.

Why a process of its own: bubblewrap's monitor exits as soon as the program does, leaving the sandbox's init (PID 1 of
its namespace) to the machine's PID 1, which reaps it when it gets round to it, or never (Docker without --init, a
pod whose PID 1 is a shell or ``ray start``). Those zombies keep counting against the slot user's process limit
(RLIMIT_NPROC), so after a burst every program fails to start. The host is a *child subreaper*
(``PR_SET_CHILD_SUBREAPER``): every orphan of a run is re-parented to it, and it answers a request only once
``waitpid`` says it has no child left, so a run's outcome is never returned while anything of it exists, whatever the
machine's PID 1 does. It is single-threaded, so it may fork (the rollout worker is threaded and must not), and it
starts with an empty environment, so nothing of the worker's (API keys, tokens) is in any process of a run.

Stdlib only; run as ``python -I -S sandbox_host.py``. Requests and replies are length-prefixed JSON on stdin/stdout:
request ``{argv, env, uid, gid, rlimits: {NAME: [soft, hard]}, stdin, stdout, stderr, wall_s, oom_score_adj}``
(paths of files the host opens for the run's fds 0-2; fd 3 is the status pipe given to ``bwrap --json-status-fd 3``);
reply ``{returncode, timed_out, status, spawn_error, reaped, seconds}``. EOF on stdin (the worker exited) ends it.
"""

import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import struct
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def read_message(fd):
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    body = _read_exactly(fd, struct.unpack("<I", header)[0])
    return None if body is None else json.loads(body)


def write_message(fd, message):
    body = json.dumps(message).encode()
    data = struct.pack("<I", len(body)) + body
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _child(request, status_w, error_w):
    """In the forked child: fds, limits, user, then exec. Any failure is reported on ``error_w`` (the run never
    started: the sandbox's failure, not the program's)."""
    error = error_w
    try:
        os.setsid()
        error = fcntl.fcntl(error_w, fcntl.F_DUPFD_CLOEXEC, 100)  # (out of the way of the fds set below)
        status = fcntl.fcntl(status_w, fcntl.F_DUPFD, 100)
        files = [os.open(request["stdin"], os.O_RDONLY), os.open(request["stdout"], os.O_WRONLY | os.O_TRUNC),
                 os.open(request["stderr"], os.O_WRONLY | os.O_TRUNC)]
        for target, fd in enumerate(files):
            os.dup2(fd, target)
        os.dup2(status, 3)
        os.dup2(error, 4, inheritable=False)
        error = 4
        os.closerange(5, 1 << 16)
        if request.get("oom_score_adj") is not None:  # the kernel's OOM killer takes a sandbox before vLLM
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(request["oom_score_adj"]))
        for name, (soft, hard) in request["rlimits"].items():
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))
        if request.get("uid") is not None:
            os.setgroups([])
            os.setgid(request["gid"])
            os.setuid(request["uid"])
        os.execve(request["argv"][0], request["argv"], request["env"])
    except BaseException as err:  # noqa: BLE001 - whatever it was, the run did not start
        os.write(error, f"{type(err).__name__}: {err}".encode()[:4000])
    os._exit(127)


def _children():
    """This process's live children (after a run: orphans of the sandbox re-parented here)."""
    me, found = os.getpid(), []
    try:
        with open("/proc/thread-self/children") as f:  # (this process's own view, whatever /proc's PID namespace)
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _reap_all():
    """Wait until no child is left, killing the ones that are still alive; how many there were."""
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid:
            reaped += 1
            continue
        for child in _children():  # alive, and ours: the pid cannot be reused before we reap it
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
            reaped += 1
        except ChildProcessError:
            return reaped


def _drain(fd):
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def run(request):
    started = time.monotonic()
    status_r, status_w = os.pipe()
    error_r, error_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child(request, status_w, error_w)
    os.close(status_w)
    os.close(error_w)
    poller = select.poll()
    poller.register(_WAKE[0], select.POLLIN)  # SIGCHLD (signal.set_wakeup_fd): works on any kernel, no pidfd
    poller.register(0, select.POLLIN)  # the worker: EOF if it exits mid-run
    deadline = started + request["wall_s"]
    timed_out = orphaned = False
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
        elif any(fd == 0 for fd, _ in poller.poll(min(left, 1.0) * 1000)):
            orphaned = True
        if timed_out or orphaned:  # the whole sandbox: bwrap dies, its namespace's init follows (--die-with-parent)
            os.kill(pid, signal.SIGKILL)  # (our unreaped child: the pid cannot have been reused)
            _, wait_status = os.waitpid(pid, 0)
            break
        _drain_wakeups()
    reaped = _reap_all()
    spawn_error = _drain(error_r)
    reply = {"returncode": os.waitstatus_to_exitcode(wait_status), "timed_out": timed_out,
             "status": _drain(status_r), "spawn_error": spawn_error or None, "reaped": reaped,
             "seconds": time.monotonic() - started}
    if orphaned:
        sys.exit(0)
    return reply


_WAKE = (-1, -1)


def _drain_wakeups():
    try:
        while os.read(_WAKE[0], 4096):
            pass
    except BlockingIOError:
        pass


def become_child_subreaper() -> str | None:
    """``prctl(PR_SET_CHILD_SUBREAPER)`` (Linux): a descendant orphaned by its parent's death is re-parented to this
    process rather than to PID 1, so this process can still find and kill it. The error, or None.
    (Also the rollout worker's, for its engine's processes: this file stays standard library only.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def main():
    error = become_child_subreaper()
    if error is not None:
        write_message(1, {"fatal": f"prctl(PR_SET_CHILD_SUBREAPER): {error}"})
        return
    global _WAKE
    _WAKE = os.pipe()
    for fd in _WAKE:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(_WAKE[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)  # (a handler, so that SIGCHLD wakes the poll above)
    write_message(1, {"ready": os.getpid()})
    while (request := read_message(0)) is not None:
        write_message(1, run(request))


if __name__ == "__main__":
    main()
