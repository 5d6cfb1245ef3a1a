"""NVML through ``nvidia-ml-py`` (``import pynvml``): one node's GPUs read the way ``nvidia-smi -q`` reads them.

Every query can be unsupported on some GPU (ECC on consumer boards, NVLink on PCIe cards, row remapping before
Ampere): such a reading is left out of the sample, never an error. Which module provides the API is
``R1_NVML_MODULE`` (default ``pynvml``): the hook through which tests inject a fake with pynvml's exact names, types
and error classes (tests/fake_nvml.py), the way a GPU-less CI has to.
"""

from __future__ import annotations

import ctypes
import importlib
import os

NVML_MODULE_ENV = "R1_NVML_MODULE"
XID_WAIT_MS = 0  # draining the event set never blocks: the monitor's loop does the waiting


def open_nvml():
    """``(nvml, None)`` once ``nvmlInit`` succeeded, else ``(None, why)``: no driver, no library, no permission."""
    nvml = importlib.import_module(os.environ.get(NVML_MODULE_ENV, "pynvml"))
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        return None, f"{type(err).__name__}: {err}"
    return nvml, None


def handle_key(handle) -> int | None:
    """A device handle's address: how an event's ``device`` is matched to a GPU index."""
    return ctypes.cast(handle, ctypes.c_void_p).value


def nvml_index(gpu: str, uuid: str | None, nvml_uuids: dict[int, str]) -> int | None:
    """The NVML index of a worker's GPU: by UUID when known (``nvml_uuids``: index -> UUID, as NVML reads them),
    else Ray's id taken as the index (right when the job sees every GPU of the node). None: not on this node."""
    if uuid is not None:
        wanted = uuid.lower().removeprefix("gpu-")
        return next((i for i, u in nvml_uuids.items() if u.lower().removeprefix("gpu-") == wanted), None)
    return int(gpu) if gpu.isdigit() else None


class NodeGpus:
    """The GPUs NVML sees on this node, their UUIDs, and an event set registered for Xid errors."""

    def __init__(self, nvml):
        self.nvml = nvml
        # by NVML index (the numbering Ray's GPU ids and CUDA_VISIBLE_DEVICES use on the node)
        self.handles: dict[int, object] = {}
        self.uuids: dict[int, str] = {}
        self.unreadable: dict[int, str] = {}
        for i in range(nvml.nvmlDeviceGetCount()):
            try:  # (a GPU of another job, hidden by the scheduler's device cgroup: NoPermission)
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                self.uuids[i] = _text(nvml.nvmlDeviceGetUUID(handle))
                self.handles[i] = handle
            except nvml.NVMLError as err:
                self.unreadable[i] = f"{type(err).__name__}: {err}"
        self._index = {handle_key(h): i for i, h in self.handles.items()}
        self.events = nvml.nvmlEventSetCreate()
        self.xid_capable = []
        for i, h in self.handles.items():
            try:
                nvml.nvmlDeviceRegisterEvents(h, nvml.nvmlEventTypeXidCriticalError, self.events)
                self.xid_capable.append(i)
            except nvml.NVMLError:
                pass  # (NotSupported: no Xid events from this GPU; its other signals still count)

    def read(self, i: int) -> dict[str, float]:
        """One sample of GPU ``i``: every reading its driver supports."""
        n, h, out = self.nvml, self.handles[i], {}

        def put(key, query, scale=1.0):
            if (value := _try(n, query)) is not None:
                out[key] = float(value) * scale

        util = _try(n, lambda: n.nvmlDeviceGetUtilizationRates(h))
        if util is not None:
            out["util_gpu_pct"], out["util_mem_pct"] = float(util.gpu), float(util.memory)
        mem = _try(n, lambda: n.nvmlDeviceGetMemoryInfo(h))
        if mem is not None:
            out["mem_used_gb"], out["mem_total_gb"] = mem.used / 2**30, mem.total / 2**30
        put("temperature_c", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
        put("power_w", lambda: n.nvmlDeviceGetPowerUsage(h), 1e-3)  # (NVML reports milliwatts)
        put("power_limit_w", lambda: n.nvmlDeviceGetEnforcedPowerLimit(h), 1e-3)
        put("sm_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))
        put("mem_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM))
        put("clocks_event_reasons", lambda: n.nvmlDeviceGetCurrentClocksEventReasons(h))
        for kind, err in (("corrected", n.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                          ("uncorrected", n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)):
            put(f"ecc_volatile_{kind}", lambda err=err: n.nvmlDeviceGetTotalEccErrors(h, err, n.NVML_VOLATILE_ECC))
            put(f"ecc_aggregate_{kind}", lambda err=err: n.nvmlDeviceGetTotalEccErrors(h, err, n.NVML_AGGREGATE_ECC))
        put("retired_pages_pending", lambda: n.nvmlDeviceGetRetiredPagesPendingStatus(h))
        rows = _try(n, lambda: n.nvmlDeviceGetRemappedRows(h))
        if rows is not None:
            for key, value in zip(("corrected", "uncorrected", "pending", "failure"), rows):
                out[f"remapped_rows_{key}"] = float(value)
        links = _try(n, lambda: self._nvlink_errors(h))
        if links is not None:
            out["nvlink_errors"] = float(links)
        put("pcie_replay", lambda: n.nvmlDeviceGetPcieReplayCounter(h))
        return out

    def _nvlink_errors(self, h) -> int | None:
        """Replay + recovery + CRC errors summed over the active links (None: no NVLink)."""
        n, total, active = self.nvml, 0, 0
        for link in range(n.NVML_NVLINK_MAX_LINKS):
            try:
                if not n.nvmlDeviceGetNvLinkState(h, link):
                    continue
            except n.NVMLError:
                break  # (NotSupported / InvalidArgument: no more links)
            active += 1
            for counter in (n.NVML_NVLINK_ERROR_DL_REPLAY, n.NVML_NVLINK_ERROR_DL_RECOVERY,
                            n.NVML_NVLINK_ERROR_DL_CRC_FLIT, n.NVML_NVLINK_ERROR_DL_CRC_DATA):
                total += _try(n, lambda link=link, counter=counter: n.nvmlDeviceGetNvLinkErrorCounter(h, link, counter)) or 0
        return total if active else None

    def wait_xids(self, timeout_ms: int) -> list[tuple[int, int]]:
        """``(gpu index, Xid)`` of the Xid events that arrive within ``timeout_ms`` (the first wait blocks, the rest
        only drain what is already queued)."""
        out = []
        while True:
            try:
                event = self.nvml.nvmlEventSetWait_v2(self.events, timeout_ms)
            except self.nvml.NVMLError_Timeout:
                return out
            timeout_ms = XID_WAIT_MS
            if event.eventType & self.nvml.nvmlEventTypeXidCriticalError:
                out.append((self._index.get(handle_key(event.device), -1), int(event.eventData)))

    def close(self) -> None:
        try:
            self.nvml.nvmlEventSetFree(self.events)
        finally:
            self.nvml.nvmlShutdown()


def _try(nvml, query):
    try:
        return query()
    except nvml.NVMLError:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
