"""The driver's side of health monitoring: one monitor per node, their incidents turned into actions.

Each step the driver asks every node's monitor for its latest readings (logged as ``health/<node>/gpu<i>/<key>``)
and the incidents it found since. Every incident goes to ``<run_dir>/health/incidents.jsonl``, the run log and W&B's
incident table; from ``alert`` up also to ``wandb.alert``. ``drain`` stops work for the rollout workers on that GPU
(the pool goes on with the others, their requests in flight are redone); the training pool cannot shrink, so a drain
there, or one that would leave no rollout worker, becomes an ``abort``: the loop stops after this step, checkpoints
and the run exits with the requeue code (the Slurm job script then requeues the job without the node).

The progress watchdog (``r1.health.watchdog``) reports here too: on a stall every node's Ray processes are dumped
with py-spy into ``<run_dir>/health/stacks-<time>/``, with the driver's own threads, before the stall's action. An
abort the stuck loop cannot carry out ends the process with the requeue code after ``HARD_EXIT_GRACE_S`` more
(resume then starts from the last periodic checkpoint).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from r1.health.heartbeat import Heartbeats
from r1.health.monitor import NodeMonitor
from r1.health.nvml import nvml_index
from r1.health.policy import Incident, action_of, escalate
from r1.health.watchdog import ProgressWatchdog
from r1.monitoring.stop import REQUEUE_EXIT

log = logging.getLogger(__name__)

HARD_EXIT_GRACE_S = 600.0
ALERT_LEVEL = {"alert": "WARN", "drain": "ERROR", "abort": "ERROR", "mask": "WARN", "stop": "ERROR"}
INCIDENT_COLUMNS = ["time", "signal", "action", "node", "gpu", "uuid", "xid", "detail"]


class HealthSupervisor:
    def __init__(self, cfg, run_dir: Path, logger, train, workers, stop):
        """``workers``: the rollout pool's ``WorkerLifecycle`` (None: a stage without one), which drains."""
        self.cfg, self.logger, self.train, self.workers, self.stop = cfg.health, logger, train, workers, stop
        self.rollout = rollout = workers.pool if workers is not None else None
        self.dir = Path(run_dir) / "health"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.incidents: list[Incident] = []
        self.monitors: dict[str, object] = {}  # Ray node id -> its monitor
        self.node_names: dict[str, str] = {}  # Ray node id -> the node's scheduler name
        self.owners: dict[tuple[str, int], list[tuple[str, int]]] = {}  # (node, NVML index) -> [(pool, worker)]
        self.node_uuids: dict[str, dict[int, str]] = {}  # Ray node id -> NVML index -> GPU UUID
        self._watchdog: ProgressWatchdog | None = None
        self._hard_exit: threading.Timer | None = None
        if not self.cfg.enabled:
            return
        monitor_cls = ray.remote(NodeMonitor)
        for node in ray.nodes():
            if node["Alive"]:
                self.monitors[node["NodeID"]] = monitor_cls.options(
                    num_cpus=0, max_concurrency=4, scheduling_strategy=NodeAffinitySchedulingStrategy(
                        node["NodeID"], soft=False)).remote(self.cfg)
        for node_id, monitor in list(self.monitors.items()):
            try:  # health never stops a run: a monitor that cannot start leaves its node unwatched, said loudly
                d = ray.get(monitor.describe.remote(), timeout=120)
            except (RayActorError, GetTimeoutError) as err:
                log.error("health: no monitor on Ray node %s (%s): its GPUs are not watched", node_id, err)
                del self.monitors[node_id]
                continue
            self.node_names[node_id] = d["node"]
            self.node_uuids[node_id] = {int(i): u for i, u in d["uuids"].items()}
            if not d["nvml"]:
                log.warning("health: no NVML on %s (%s): CPU and memory only", d["node"], d["why_no_nvml"])
            for gpu, why in d["unreadable"].items():
                log.warning("health: %s gpu%s cannot be read (%s): not watched", d["node"], gpu, why)
        pools = {"train": train, "rollout": rollout}  # (an SFT run has no rollout pool)
        for pool, actors in ((name, p.actors) for name, p in pools.items() if p is not None):
            for index, (node_id, gpus, uuids) in enumerate(ray.get([a.placement.remote() for a in actors])):
                for gpu, uuid in zip(gpus, uuids, strict=True):
                    at = nvml_index(gpu, uuid, self.node_uuids.get(node_id, {}))
                    if at is None:
                        log.warning("health: %s worker %d's GPU %s (%s) is not one NVML lists on its node: not mapped",
                                    pool, index, gpu, uuid)
                        continue
                    self.owners.setdefault((self.node_names.get(node_id, node_id), at), []).append((pool, index))
        (self.dir / "gpus.json").write_text(json.dumps(  # which worker runs on which GPU: what a drain stops
            [{"node": node, "gpu": gpu, "workers": [f"{p} {i}" for p, i in owners]}
             for (node, gpu), owners in sorted(self.owners.items())], indent=1))

    # --- each step ----------------------------------------------------------------------------------------------
    def check(self) -> dict[str, float]:
        """The latest readings of every node, as metrics; acts on the incidents found since the last check."""
        metrics: dict[str, float] = {}
        asked = {node_id: monitor.report.remote() for node_id, monitor in self.monitors.items()}  # all nodes at once
        for node_id, ref in asked.items():
            try:
                report = ray.get(ref, timeout=60)
            except (RayActorError, GetTimeoutError) as err:
                log.warning("health: the monitor on %s does not answer (%s); dropped",
                            self.node_names.get(node_id, node_id), type(err).__name__)
                del self.monitors[node_id]
                continue
            node = report["node"]
            metrics.update({f"health/{node}/{k}": v for k, v in report["host"].items()})
            metrics[f"health/{node}/monitor_busy_frac"] = report["monitor"]["busy_frac"]
            for gpu, sample in report["gpus"].items():
                metrics.update({f"health/{node}/gpu{gpu}/{k}": v for k, v in sample.items()})
            for found in report["incidents"]:
                self._act(Incident(**found))
        metrics["health/incidents_total"] = len(self.incidents)
        if self.rollout is not None:
            metrics["health/drained_workers"] = len(self.rollout.drained)
        return metrics

    def _act(self, incident: Incident) -> None:
        if incident.action == "drain":
            incident = self._drain(incident)
        self._record(incident)
        if incident.action == "abort":
            self.stop.abort(f"health: {incident.signal} on {incident.where} ({incident.detail})", incident.to_dict())

    def _drain(self, incident: Incident) -> Incident:
        owners = self.owners.get((incident.node, incident.gpu), [])
        if any(pool == "train" for pool, _ in owners) or self.rollout is None:
            return escalate(incident, "abort", "a training worker runs on it and the training pool cannot shrink")
        for _, index in owners:
            if index not in self.rollout.drained:
                self.workers.drain(index)
        if not self.rollout.live:
            return escalate(incident, "abort", "no rollout worker left")
        workers = ", ".join(f"rollout worker {i}" for _, i in owners) or "no r1 worker runs on it"
        return replace(incident, detail=f"{incident.detail}; drained: {workers}")

    def record(self, incident: Incident) -> None:
        """An incident found outside the GPU monitors (the mismatch canary, whose actions - mask, stop - are its
        own): into the same file, log, table and alerts."""
        self._record(incident)

    def _record(self, incident: Incident) -> None:
        self.incidents.append(incident)
        with (self.dir / "incidents.jsonl").open("a") as f:
            f.write(json.dumps(incident.to_dict()) + "\n")
        (log.warning if incident.action != "log" else log.info)(
            "health incident: %s on %s: %s -> %s", incident.signal, incident.where, incident.detail, incident.action)
        if incident.action in ALERT_LEVEL:
            xid = f" (Xid {incident.xid})" if incident.xid is not None else ""
            self.logger.alert(title=f"r1 {incident.action}: {incident.signal}{xid} on {incident.where}",
                              text=f"{incident.detail}. Action taken: {incident.action}. See docs/sre.md.",
                              level=ALERT_LEVEL[incident.action])
        self.logger.summary_table("health/incidents", INCIDENT_COLUMNS,
                                  [[getattr(i, c) for c in INCIDENT_COLUMNS] for i in self.incidents])

    # --- the watchdog -------------------------------------------------------------------------------------------
    def watch(self, signs) -> None:
        """Start the progress watchdog (health.stall_minutes; 0: none) on ``signs()`` and every worker's heartbeat
        (``r1.health.heartbeat``): progress is a change in either."""
        if self.cfg.stall_minutes > 0:
            stall_s = self.cfg.stall_minutes * 60
            beats = Heartbeats([self.train, self.rollout], timeout_s=min(5.0, stall_s / 8))
            self._watchdog = ProgressWatchdog(stall_s, lambda: (signs(), beats.read()), self._on_stall)

    def _on_stall(self, idle_s: float) -> None:
        stacks = self.dump_stacks()
        incident = Incident("stall", action_of("stall", self.cfg), "driver", detail=(
            f"no finished step, no generated group and no worker heartbeat for {idle_s / 60:.1f} min (health.stall_minutes="
            f"{self.cfg.stall_minutes:g}); stacks in {stacks}"), time=time.time())
        self._record(incident)
        if incident.action == "abort":
            self.stop.abort(f"health: stall ({incident.detail})", incident.to_dict())
            grace = max(HARD_EXIT_GRACE_S, self.cfg.stall_minutes * 60)
            self._hard_exit = threading.Timer(grace, self._exit_now, args=(grace,))
            self._hard_exit.daemon = True
            self._hard_exit.start()

    def dump_stacks(self) -> Path:
        """The driver's threads and every node's Ray processes (py-spy), one file each, in a new directory."""
        out = self.dir / f"stacks-{time.strftime('%Y%m%dT%H%M%S')}"
        out.mkdir(parents=True, exist_ok=True)
        with (out / "driver.txt").open("w") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
        refs = {node_id: m.dump_stacks.remote() for node_id, m in self.monitors.items()}
        for node_id, ref in refs.items():
            node = self.node_names.get(node_id, node_id)
            try:
                dumps = ray.get(ref, timeout=180)
            except (RayActorError, GetTimeoutError) as err:
                (out / f"{node}.error.txt").write_text(f"no stacks from {node}: {err}\n")
                continue
            for title, text in dumps.items():
                pid = title.split()[0]
                (out / f"{node}-{pid}.txt").write_text(f"# {title}\n{text}")
        log.warning("health: stacks of the driver and every Ray worker written to %s", out)
        return out

    def _exit_now(self, grace: float) -> None:
        log.critical("health: the run did not stop within %.0f s of the abort; exiting with %d (requeue)", grace,
                     REQUEUE_EXIT)
        os._exit(REQUEUE_EXIT)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
        if self._hard_exit is not None:
            self._hard_exit.cancel()
        for monitor in self.monitors.values():
            try:
                ray.get(monitor.close.remote(), timeout=30)
            except (RayActorError, GetTimeoutError):
                pass
            ray.kill(monitor)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
