"""Load an OCI seccomp profile (the JSON format Kubernetes' ``Localhost`` profiles and container runtimes use), then
exec a command under it: ``python -m tests.seccomp_exec PROFILE.json COMMAND...``.

The filter is built with the machine's libseccomp (libseccomp.so.2, through ctypes), as runc and crun build theirs,
and loaded with no_new_privs, as a runtime does for a non-root container. Supported: defaultAction/defaultErrnoRet and
rules of names, action, errnoRet and args (index/value/valueTwo/op); conditional rules (includes/excludes) are
refused rather than misread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import sys

ACTIONS = {"SCMP_ACT_ALLOW": 0x7FFF0000, "SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_PROCESS": 0x80000000,
           "SCMP_ACT_LOG": 0x7FFC0000}
OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6,
       "SCMP_CMP_MASKED_EQ": 7}


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _action(name: str, errno_ret: int | None) -> int:
    if name == "SCMP_ACT_ERRNO":
        return 0x00050000 | ((errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    return ACTIONS[name]


def load(profile: dict) -> None:
    lib = library()
    if lib is None:
        raise OSError("libseccomp.so.2 not found")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = lib.seccomp_init(_action(profile["defaultAction"], profile.get("defaultErrnoRet")))
    for rule in profile.get("syscalls", []):
        unknown = set(rule) - {"names", "action", "errnoRet", "args", "comment"}
        if unknown:
            raise ValueError(f"rule keys this loader does not interpret: {sorted(unknown)}")
        args = rule.get("args") or []
        cmps = (ArgCmp * max(1, len(args)))(*[
            ArgCmp(a["index"], OPS[a["op"]], a["value"], a.get("valueTwo", 0)) for a in args])
        for name in rule["names"]:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:  # not a syscall of this architecture
                continue
            rc = lib.seccomp_rule_add_array(ctx, _action(rule["action"], rule.get("errnoRet")), number, len(args),
                                            cmps)
            if rc != 0:
                raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
    rc = lib.seccomp_load(ctx)
    if rc != 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        load(json.load(f))
    os.execv(sys.argv[2], sys.argv[2:])
