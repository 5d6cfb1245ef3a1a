"""A fake NVML for machines without a GPU: pynvml's own names, signatures, ctypes return types and error classes,
driven by a fault script. ``R1_NVML_MODULE=tests.fake_nvml`` makes r1's health monitor import it instead of pynvml.

Everything not emulated here is the real ``pynvml`` function (``from pynvml import *``), which fails the way it does
on a machine without a driver. The script is the JSON file named by ``FAKE_NVML_SCRIPT``, re-read on every call so a
test can inject a fault mid-run (write it atomically)::

    {"gpus": 2,                       # GPUs on every node
     "faults": [                      # each applies to "node" (default: every node) and "gpu"
        {"gpu": 0, "kind": "temperature", "start_c": 60, "rise_c": 10},   # +rise_c per reading of the temperature
        {"gpu": 1, "kind": "xid", "code": 79},                          # one Xid event, delivered once per process
        {"gpu": 0, "kind": "ecc_uncorrectable", "count": 2},            # volatile uncorrected ECC errors
        {"gpu": 0, "kind": "throttle", "reasons": 64},                  # clocks event reasons (0x40: HW thermal)
        {"gpu": 0, "kind": "nvlink", "errors": 3},                      # replay errors on link 0
        {"gpu": 1, "kind": "hidden"}]}                                  # another job's GPU: NoPermission

The node a fault names is matched like r1 names nodes: Slurm's node name, else NODE_NAME, else the host name.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import time

import pynvml
from pynvml import *  # every name pynvml has; the functions below replace the emulated ones
from pynvml import (
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNINITIALIZED,
    NVMLError,
    c_nvmlEventData_t,
    c_nvmlMemory_t,
    c_nvmlUtilization_t,
)

EMULATED = (
    "nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID",
    "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetRetiredPagesPendingStatus", "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetNvLinkState", "nvmlDeviceGetNvLinkErrorCounter", "nvmlDeviceGetPcieReplayCounter",
    "nvmlEventSetCreate", "nvmlDeviceRegisterEvents", "nvmlEventSetWait_v2", "nvmlEventSetFree",
)
_state = {"init": 0, "temperature_reads": {}, "xids_sent": set()}
NVLINKS = 2


def _node() -> str:
    return os.environ.get("SLURMD_NODENAME") or os.environ.get("NODE_NAME") or socket.gethostname()


def _script() -> dict:
    with open(os.environ["FAKE_NVML_SCRIPT"]) as f:
        return json.load(f)


def _faults(gpu: int, kind: str) -> list[tuple[int, dict]]:
    return [(n, f) for n, f in enumerate(_script().get("faults", []))
            if f["kind"] == kind and f["gpu"] == gpu and f.get("node", _node()) == _node()]


def _index(handle) -> int:
    if not _state["init"]:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    index = (ctypes.cast(handle, ctypes.c_void_p).value or 0) - 1
    if not 0 <= index < _script()["gpus"]:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return index


def nvmlInit():
    _state["init"] += 1


def nvmlShutdown():
    if not _state["init"]:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    _state["init"] -= 1


def nvmlDeviceGetCount():
    if not _state["init"]:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return int(_script()["gpus"])


def nvmlDeviceGetHandleByIndex(index):
    handle = ctypes.cast(ctypes.c_void_p(index + 1), pynvml.c_nvmlDevice_t)
    _index(handle)
    if _faults(index, "hidden"):
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    return handle


def nvmlDeviceGetUUID(handle):
    return f"GPU-fake-{_node()}-{_index(handle)}"


def nvmlDeviceGetUtilizationRates(handle):
    _index(handle)
    return c_nvmlUtilization_t(gpu=97, memory=41)


def nvmlDeviceGetMemoryInfo(handle, version=None):
    _index(handle)
    total = 80 * 2**30
    return c_nvmlMemory_t(total=total, free=total - 61 * 2**30, used=61 * 2**30)


def nvmlDeviceGetTemperature(handle, sensor):
    gpu = _index(handle)
    reads = _state["temperature_reads"][gpu] = _state["temperature_reads"].get(gpu, -1) + 1
    for _, f in _faults(gpu, "temperature"):
        return int(f["start_c"] + f["rise_c"] * reads)
    return 55


def nvmlDeviceGetPowerUsage(handle):
    _index(handle)
    return 612_000  # mW


def nvmlDeviceGetEnforcedPowerLimit(handle):
    _index(handle)
    return 700_000


def nvmlDeviceGetClockInfo(handle, type):
    _index(handle)
    return 1980 if type == pynvml.NVML_CLOCK_SM else 2619


def nvmlDeviceGetCurrentClocksEventReasons(handle):
    gpu = _index(handle)
    reasons = 0
    for _, f in _faults(gpu, "throttle"):
        reasons |= int(f["reasons"])
    return reasons


def nvmlDeviceGetTotalEccErrors(handle, errorType, counterType):
    gpu = _index(handle)
    if errorType == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
        return sum(int(f["count"]) for _, f in _faults(gpu, "ecc_uncorrectable"))
    return 0


def nvmlDeviceGetRetiredPagesPendingStatus(device):
    _index(device)
    return 0


def nvmlDeviceGetRemappedRows(device):
    _index(device)
    return (0, 0, 0, 0)


def nvmlDeviceGetNvLinkState(device, link):
    _index(device)
    if link >= NVLINKS:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return 1


def nvmlDeviceGetNvLinkErrorCounter(device, link, counter):
    gpu = _index(device)
    if link >= NVLINKS:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if link == 0 and counter == pynvml.NVML_NVLINK_ERROR_DL_REPLAY:
        return sum(int(f["errors"]) for _, f in _faults(gpu, "nvlink"))
    return 0


def nvmlDeviceGetPcieReplayCounter(handle):
    _index(handle)
    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # (as on boards whose driver does not count replays)


def nvmlEventSetCreate():
    if not _state["init"]:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return pynvml.c_nvmlEventSet_t()


def nvmlDeviceRegisterEvents(handle, eventTypes, eventSet):
    _index(handle)


def nvmlEventSetWait_v2(eventSet, timeoutms):
    """The next Xid of the script not yet delivered in this process; NVMLError_Timeout after ``timeoutms``."""
    deadline = time.monotonic() + timeoutms / 1000
    while True:
        for gpu in range(_script()["gpus"]):
            for n, f in _faults(gpu, "xid"):
                if n not in _state["xids_sent"]:
                    _state["xids_sent"].add(n)
                    return c_nvmlEventData_t(device=nvmlDeviceGetHandleByIndex(gpu),
                                             eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=int(f["code"]))
        if time.monotonic() >= deadline:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def nvmlEventSetFree(eventSet):
    return None


def write_script(path, script: dict) -> None:
    """Replace the script atomically (readers in other processes never see half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(script, f)
    os.replace(tmp, path)
