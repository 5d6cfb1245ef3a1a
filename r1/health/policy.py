"""The health policy as pure functions: two samples of a GPU (and its Xid events) -> incidents, each with its action.

A *state* signal (thermal slowdown, temperature over the limit, a pending page retirement) fires when it turns on,
not on every sample while it stays on; a *counter* signal (ECC, NVLink, PCIe replay) fires when its counter goes up
between two samples. Volatile uncorrected ECC errors count from zero (they reset with the driver), so a GPU that
already has them at the first sample is reported at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

ACTIONS = ("log", "alert", "drain", "abort")  # rising: each does what the ones before it do

# NVML clock-event-reason bits (nvmlClocksEventReason*), the ones the policy reads
SW_POWER_CAP, HW_SLOWDOWN, SW_THERMAL, HW_THERMAL, HW_POWER_BRAKE = 0x04, 0x08, 0x20, 0x40, 0x80

STATES = {  # signal -> whether a sample shows it
    "thermal_slowdown": lambda s, cfg: _bits(s) & (SW_THERMAL | HW_THERMAL),
    "hw_slowdown": lambda s, cfg: _bits(s) & (HW_SLOWDOWN | HW_POWER_BRAKE),
    "power_slowdown": lambda s, cfg: _bits(s) & SW_POWER_CAP,
    "temperature": lambda s, cfg: s.get("temperature_c", 0.0) >= cfg.temperature_c,
    "retired_pages_pending": lambda s, cfg: s.get("retired_pages_pending", 0.0) > 0,
    "row_remap_pending": lambda s, cfg: s.get("remapped_rows_pending", 0.0) > 0,
    "row_remap_failure": lambda s, cfg: s.get("remapped_rows_failure", 0.0) > 0,
}
COUNTERS = {  # signal -> (reading, whether it counts from zero rather than from the first sample)
    "ecc_uncorrectable": ("ecc_volatile_uncorrected", True),
    "ecc_correctable": ("ecc_volatile_corrected", False),
    "nvlink_errors": ("nvlink_errors", False),
    "pcie_replay": ("pcie_replay", False),
}


@dataclass(frozen=True)
class Incident:
    signal: str
    action: str
    node: str
    gpu: int | None = None  # NVML index (None: the whole run, e.g. the watchdog's stall)
    uuid: str | None = None
    detail: str = ""
    xid: int | None = None
    time: float = 0.0

    @property
    def where(self) -> str:
        return self.node if self.gpu is None else f"{self.node} gpu{self.gpu} ({self.uuid})"

    def to_dict(self) -> dict:
        return asdict(self)


def action_of(signal: str, cfg) -> str:
    action = getattr(cfg.actions, signal)
    return str(getattr(action, "value", action))  # (an enum in a structured config, a string in a plain one)


def gpu_incidents(cfg, node: str, gpu: int, uuid: str, before: dict | None, now: dict, xids: list[int],
                  time: float = 0.0) -> list[Incident]:
    """What changed on one GPU between two samples (``before`` None: the first one)."""
    found: list[tuple[str, str, int | None]] = []
    for xid in xids:
        signal = "xid_critical" if xid in cfg.xid_critical_codes else "xid"
        found.append((signal, f"Xid {xid}", xid))
    for signal, shows in STATES.items():
        if shows(now, cfg) and not (before is not None and shows(before, cfg)):
            found.append((signal, _state_detail(signal, now, cfg), None))
    for signal, (key, from_zero) in COUNTERS.items():
        if key not in now:
            continue
        base = before.get(key, now[key]) if before is not None else (0.0 if from_zero else now[key])
        if now[key] > base:
            found.append((signal, f"{key} {base:.0f} -> {now[key]:.0f}", None))
    return [Incident(signal, action_of(signal, cfg), node, gpu, uuid, detail, xid, time)
            for signal, detail, xid in found]


def escalate(incident: Incident, action: str, why: str) -> Incident:
    """The same incident with a stronger action (a drain the training pool cannot take becomes an abort)."""
    return replace(incident, action=action, detail=f"{incident.detail}; {why}")


def worst(incidents: list[Incident]) -> Incident | None:
    return max(incidents, key=lambda i: ACTIONS.index(i.action), default=None)


def _bits(sample: dict) -> int:
    return int(sample.get("clocks_event_reasons", 0))


def _state_detail(signal: str, sample: dict, cfg) -> str:
    if signal == "temperature":
        return f"{sample['temperature_c']:.0f} C >= health.temperature_c={cfg.temperature_c:g}"
    if signal.endswith("slowdown"):
        return f"clocks event reasons 0x{_bits(sample):x}, SM clock {sample.get('sm_clock_mhz', 0):.0f} MHz"
    return signal.replace("_", " ")
