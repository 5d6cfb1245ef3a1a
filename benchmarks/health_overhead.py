"""Benchmark: what r1's GPU health monitoring costs a node and a step.

    .venv/bin/python benchmarks/health_overhead.py [--gpus 8] [--seconds 20] [--intervals 0.5,2,10]

One node monitor (``r1.health.monitor.NodeMonitor``) as the driver starts it -- a Ray actor with 0 CPUs -- sampling
``--gpus`` GPUs. Without a GPU here, NVML is the test backend (``tests/fake_nvml.py``: pynvml's API, each call a
JSON read of the fault script, so a call costs more than a real NVML query of a local driver, ~10-100 us). Measured:
the monitor's busy share of one core at each interval (what ``health/<node>/monitor_busy_frac`` reports), the time
of one sample, and the driver's ``report()`` round trip per step (what ``health.check()`` adds to a step per node).

Prints a table; copy it, with machine and date, into benchmarks/RESULTS.md. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--intervals", default="0.5,2,10")
    args = parser.parse_args()

    import ray
    from omegaconf import OmegaConf

    from r1.config.schema import HealthConfig
    from r1.health.monitor import NodeMonitor
    from tests.fake_nvml import write_script

    script = Path(tempfile.mkdtemp()) / "nvml.json"
    write_script(script, {"gpus": args.gpus, "faults": []})
    env = {"R1_NVML_MODULE": "tests.fake_nvml", "FAKE_NVML_SCRIPT": str(script), "PYTHONPATH": str(REPO)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    rows = []
    for interval in [float(x) for x in args.intervals.split(",")]:
        cfg = OmegaConf.structured(HealthConfig)
        cfg.interval_s = interval
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, enum_to_str=True))
        monitor = ray.remote(NodeMonitor).options(num_cpus=0, max_concurrency=4).remote(cfg)
        ray.get(monitor.describe.remote())
        round_trips = []
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            report = ray.get(monitor.report.remote())
            round_trips.append(time.perf_counter() - t0)
            time.sleep(0.25)
        m = report["monitor"]
        rows.append((interval, m["samples"], m["busy_s"] / max(m["samples"], 1) * 1e3, m["busy_frac"] * 100,
                     statistics.median(round_trips) * 1e3, len(str(report["gpus"]))))
        ray.get(monitor.close.remote())
        ray.kill(monitor)
    ray.shutdown()

    print(f"# health monitor overhead: {args.gpus} GPUs (test NVML backend), {args.seconds:.0f} s per interval; "
          f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| interval s | samples | ms per sample | busy % of a core | report() round trip ms | report bytes |")
    print("|---|---|---|---|---|---|")
    for interval, samples, per_sample, busy, rtt, size in rows:
        print(f"| {interval:g} | {samples} | {per_sample:.1f} | {busy:.2f} | {rtt:.2f} | {size} |")


if __name__ == "__main__":
    main()
