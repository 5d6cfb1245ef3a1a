"""One health monitor per node: a Ray actor pinned there, sampling NVML (and CPU/memory) on its own thread.

It judges every sample with the pure policy (``r1.health.policy``) as it takes it, so a short thermal episode or an
Xid between two driver steps is not missed, and keeps the incidents until the driver collects them. It also sets
Ray metrics (``r1_gpu_*`` gauges, tagged node and gpu) that Ray exports for Prometheus on every node, and dumps the
Python stacks of this node's processes (py-spy) when the watchdog asks. Where NVML is absent it reports CPU and memory
only (``describe`` says why; the driver says so once per node).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import psutil

from r1.health.nvml import NodeGpus, open_nvml
from r1.health.policy import Incident, gpu_incidents

log = logging.getLogger(__name__)

PROMETHEUS = ("util_gpu_pct", "mem_used_gb", "temperature_c", "power_w", "sm_clock_mhz", "clocks_event_reasons",
              "ecc_volatile_uncorrected", "ecc_volatile_corrected", "remapped_rows_pending", "nvlink_errors",
              "pcie_replay")


def node_name() -> str:
    """The name a scheduler knows this node by: Slurm's node name, Kubernetes' (the chart passes spec.nodeName as
    NODE_NAME), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or os.environ.get("NODE_NAME") or socket.gethostname()


class NodeMonitor:
    def __init__(self, health_cfg):
        self.cfg, self.node = health_cfg, node_name()
        nvml, self.why_no_nvml = open_nvml()
        self.gpus = None  # (None: the driver says so, once per node)
        if nvml is not None:
            try:
                self.gpus = NodeGpus(nvml)
            except nvml.NVMLError as err:  # a driver that answers nvmlInit but not the device queries
                self.why_no_nvml = f"{type(err).__name__}: {err}"
        self._lock = threading.Lock()
        self._latest: dict[int, dict] = {}
        self._incidents: list[Incident] = []
        self._node: dict[str, float] = {}
        self.samples, self.busy_s, self._started = 0, 0.0, time.monotonic()
        self._gauges = self._make_gauges()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="r1-health", daemon=True)
        self._thread.start()

    # --- sampling -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        psutil.cpu_percent()  # (the first call only starts psutil's CPU clock)
        while not self._stop.is_set():
            self._sample(xids=[])
            if self.gpus is not None and self.gpus.xid_capable:  # the wait for Xid events is the sleep
                if xids := self.gpus.wait_xids(int(self.cfg.interval_s * 1000)):
                    self._sample(xids)
            else:
                self._stop.wait(self.cfg.interval_s)

    def _sample(self, xids: list[tuple[int, int]]) -> None:
        started = time.perf_counter()
        mem = psutil.virtual_memory()
        node = {"cpu_pct": psutil.cpu_percent(), "mem_used_gb": (mem.total - mem.available) / 2**30,
                "mem_total_gb": mem.total / 2**30}
        now, found = {}, []
        if self.gpus is not None:
            for i, uuid in self.gpus.uuids.items():
                now[i] = self.gpus.read(i)
                found += gpu_incidents(self.cfg, self.node, i, uuid, self._latest.get(i), now[i],
                                       [x for g, x in xids if g == i], time.time())
                for key in PROMETHEUS:
                    if key in now[i]:
                        self._gauges[key].set(now[i][key], tags={"node": self.node, "gpu": str(i)})
        for incident in found:
            log.warning("health: %s on %s: %s -> %s", incident.signal, incident.where, incident.detail,
                        incident.action)
        with self._lock:
            self._node, self._latest = node, {**self._latest, **now}
            self._incidents += found
            self.samples += 1
            self.busy_s += time.perf_counter() - started

    def _make_gauges(self) -> dict:
        try:
            from ray.util.metrics import Gauge
        except ImportError:  # (outside Ray: no Prometheus export)
            return {}
        return {key: Gauge(f"r1_gpu_{key}", description=f"NVML {key} per GPU (r1 health monitor)",
                           tag_keys=("node", "gpu")) for key in PROMETHEUS} if self.gpus is not None else {}

    # --- what the driver asks -----------------------------------------------------------------------------------
    def report(self) -> dict:
        """The latest sample of every GPU and of the node, the monitor's own cost, and the incidents found since
        the last report (handed over once)."""
        with self._lock:
            incidents, self._incidents = self._incidents, []
            elapsed = max(time.monotonic() - self._started, 1e-9)
            return {
                "node": self.node, "nvml": self.gpus is not None, "why_no_nvml": self.why_no_nvml,
                "gpus": {i: dict(s) for i, s in self._latest.items()}, "host": dict(self._node),
                "monitor": {"samples": self.samples, "busy_s": self.busy_s, "busy_frac": self.busy_s / elapsed},
                "incidents": [i.to_dict() for i in incidents],
            }

    def describe(self) -> dict:
        return {"node": self.node, "nvml": self.gpus is not None, "why_no_nvml": self.why_no_nvml,
                "unreadable": dict(self.gpus.unreadable) if self.gpus is not None else {},
                "uuids": dict(self.gpus.uuids) if self.gpus is not None else {}}

    def dump_stacks(self) -> dict[str, str]:
        """``{"<pid> <process title>": py-spy dump}`` of every Ray worker process on this node: this monitor's
        siblings under the node's raylet (``--nonblocking``: a hung process is read, not paused)."""
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        out = {}
        for proc in psutil.Process(os.getppid()).children():
            try:
                title = " ".join(proc.cmdline()).strip()  # (Ray pads its process titles)
            except psutil.Error:
                continue
            if proc.pid == os.getpid() or not title.startswith("ray::") or title.startswith("ray::IDLE"):
                continue
            try:
                done = subprocess.run([spy if os.path.exists(spy) else "py-spy", "dump", "--nonblocking", "--pid",
                                       str(proc.pid)], capture_output=True, text=True, timeout=30, check=False)
                out[f"{proc.pid} {title}"] = done.stdout or done.stderr
            except (OSError, subprocess.TimeoutExpired) as err:
                out[f"{proc.pid} {title}"] = f"py-spy failed: {err}"
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.cfg.interval_s + 5)
        if self.gpus is not None:
            self.gpus.close()
