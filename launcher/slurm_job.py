"""The driver inside a Slurm job: ``python -m launcher.slurm_job <run_dir>/config.yaml`` (the job script's last step).

Runs the resolved config ``r1-launch`` saved at submission on the job's Ray cluster (``RAY_ADDRESS``, set by the
script), once every node of the job has joined it, and decides what the job does next:

- the run finished: exit 0, the job ends COMPLETED;
- SIGUSR1 (Slurm's warning before the time limit or a preemption): the driver finished its step and checkpointed;
  exit ``REQUEUE_EXIT`` and the job script requeues the job, whose next attempt continues from that checkpoint;
- the driver failed: requeue likewise while fewer than ``cluster.slurm.max_failed_attempts`` attempts have failed,
  else exit 1 (FAILED);
- SIGTERM to the whole job (preemption without ``send_user_signal``, an admin's ``scancel --signal=TERM``): every
  step gets it, the Ray nodes end at once, so the driver can only stop (a checkpoint needs the workers); the job
  script then asks ``--ended``, which requeues the job (not counted as a failure): the next attempt resumes from
  the latest complete checkpoint. A job that was *cancelled* (``scancel``, ``r1-launch cancel``) is not requeued;
- the driver killed alone (the kernel's OOM killer, SIGKILL): the job script asks ``--ended``; it counts as a
  failed attempt and the job is requeued while attempts are left (it used to end FAILED at once);
- a health abort (a sick GPU, a stalled run: ``r1.health``): the driver checkpointed; the node is added to
  ``<run_dir>/slurm-<job>.exclude`` and ``REQUEUE_EXIT`` makes the job script requeue the job with
  ``ExcNodeList`` set to those nodes, so the next attempt runs elsewhere (a stall names no node: nothing excluded).

Each attempt is recorded in ``<run_dir>/slurm_attempts.jsonl`` (a start line and, unless it was killed, an end line).
An attempt with no end line was killed with its node, or requeued by Slurm or an admin before it could say so: it
counts as failed, so a job that keeps losing nodes also stops. A requeued attempt always resumes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from r1.monitoring.stop import REQUEUE_EXIT, exit_code

ATTEMPTS_FILE = "slurm_attempts.jsonl"
EXCLUDE_FILE = "slurm-{job}.exclude"  # the nodes a health abort found sick, comma-separated (the job script reads it)


class AttemptLog:
    """The attempts of one Slurm job on a run directory (a job id keeps its number across requeues)."""

    def __init__(self, run_dir: Path, job: str):
        self.path, self.job = Path(run_dir) / ATTEMPTS_FILE, job

    def records(self) -> list[dict]:
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return [r for r in map(json.loads, lines) if r["job"] == self.job]

    def failures(self) -> int:
        """Earlier attempts that failed or never said how they ended (killed)."""
        records = self.records()
        ended = {r["attempt"]: r["outcome"] for r in records if r["event"] == "end"}
        return sum(ended.get(r["attempt"], "killed") in ("failed", "killed") for r in records if r["event"] == "start")

    def write(self, event: str, attempt: int, **fields) -> None:
        record = {"job": self.job, "attempt": attempt, "event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def exclude_node(path: Path, node: str) -> list[str]:
    """Add ``node`` to the job's excluded nodes; all of them, in the order they were found."""
    nodes = [n for n in path.read_text().strip().split(",") if n] if path.is_file() else []
    if node not in nodes:
        nodes.append(node)
    path.write_text(",".join(nodes) + "\n")
    return nodes


def main(config_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = OmegaConf.load(config_path)
    cfg.cluster.ray_address = os.environ["RAY_ADDRESS"]
    job, attempt = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    allowed = cfg.cluster.slurm.max_failed_attempts
    attempts = AttemptLog(Path(cfg.run_dir), job)
    failed = attempts.failures()
    if failed >= allowed:
        attempts.write("end", attempt, outcome="gave up")
        print(f"r1: {failed} attempts of Slurm job {job} failed (cluster.slurm.max_failed_attempts={allowed}): "
              f"not trying again. See {attempts.path} and the slurm-{job}.out log.", file=sys.stderr)
        return 1

    from r1.checkpoint import CheckpointManager
    from r1.cluster import connect, wait_for_nodes
    from r1.stages import run

    if attempt > 0:
        cfg.resume = True  # a requeued attempt continues from the latest checkpoint, whatever the first one did
    latest = CheckpointManager(Path(cfg.run_dir) / "checkpoints").latest() if cfg.resume else None
    attempts.write("start", attempt, node=os.environ.get("SLURMD_NODENAME", socket.gethostname()),
                   resume_from=latest.name if latest else None)
    try:
        connect(cfg.cluster)
        wait_for_nodes(int(os.environ.get("R1_EXPECTED_NODES", "1")))
        result = run(cfg)
    except Exception as err:  # noqa: BLE001 -- any failure of the attempt: requeued while attempts are left
        traceback.print_exc()
        attempts.write("end", attempt, outcome="failed", error=f"{type(err).__name__}: {err}"[:500])
        if failed + 1 < allowed:
            print(f"r1: attempt {attempt} of Slurm job {job} failed; requeueing ({failed + 1} of "
                  f"{allowed} failed attempts allowed)", file=sys.stderr)
            return REQUEUE_EXIT
        return 1
    stopped_by = result.get("stopped_by")
    if halted := result.get("halted"):
        attempts.write("end", attempt, outcome="halted", step=result.get("step"), signal=halted["signal"])
    elif aborted := result.get("aborted"):
        if aborted.get("gpu") is not None:  # a node's GPU: never again on that node, for this job
            exclude_node(Path(cfg.run_dir) / EXCLUDE_FILE.format(job=job), aborted["node"])
        attempts.write("end", attempt, outcome="aborted", step=result.get("step"), signal=aborted["signal"],
                       node=aborted["node"], gpu=aborted.get("gpu"))
    elif stopped_by == signal.SIGUSR1:  # time limit or preemption ahead: checkpointed, come back
        attempts.write("end", attempt, outcome="preempted", step=result.get("step"))
    elif stopped_by:
        attempts.write("end", attempt, outcome=f"stopped by {signal.Signals(stopped_by).name}", step=result.get("step"))
    else:
        attempts.write("end", attempt, outcome="completed", step=result.get("step"))
    return exit_code(result)  # REQUEUE_EXIT makes the job script requeue the job


def job_state(job: str) -> str:
    """The controller's state of the job ("" if it cannot say)."""
    import subprocess

    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=False).stdout
    return next((w.split("=", 1)[1] for w in shown.split() if w.startswith("JobState=")), "")


def ended(config_path: str, rc: int, terminated: bool) -> int:
    """The job script's question when the driver did not end by itself (``rc`` > 128) or the job was signalled:
    requeue (``REQUEUE_EXIT``) or end with which code. Records the attempt's end where the driver could not."""
    cfg = OmegaConf.load(config_path)
    job, attempt = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    state = job_state(job)
    if state.startswith("CANCELLED"):  # scancel / r1-launch cancel: the user's word, not a failure to recover from
        return rc
    if rc == 0:  # (it finished as the signal came)
        return 0
    attempts = AttemptLog(Path(cfg.run_dir), job)
    said = [r["outcome"] for r in attempts.records() if r["event"] == "end" and r["attempt"] == attempt]
    killed_by = signal.Signals(rc - 128).name if 128 < rc < 128 + signal.NSIG else None
    if terminated:  # the job was told to stop (preemption, an admin): not the run's fault, come back
        if not said or said[-1] in ("failed", "stopped by SIGTERM"):  # (its workers went first: not a failure)
            attempts.write("end", attempt, outcome="terminated", signal=killed_by)  # (the last end record counts)
        print(f"r1: Slurm job {job} was terminated (state {state or '?'}); requeueing: the next attempt resumes from "
              "the latest complete checkpoint", file=sys.stderr)
        return REQUEUE_EXIT
    if killed_by is None:
        return rc
    if not said:
        attempts.write("end", attempt, outcome="killed", signal=killed_by)
    failed, allowed = attempts.failures(), cfg.cluster.slurm.max_failed_attempts
    print(f"r1: the driver of Slurm job {job} was killed by {killed_by} (out of memory?); {failed} of {allowed} "
          f"failed attempts allowed" + ("; requeueing" if failed < allowed else "; not trying again"), file=sys.stderr)
    return REQUEUE_EXIT if failed < allowed else 1


if __name__ == "__main__":
    if sys.argv[1] == "--ended":  # (the job script, after the driver: --ended <rc> <terminated> <config>)
        sys.exit(ended(sys.argv[4], int(sys.argv[2]), sys.argv[3] == "1"))
    sys.exit(main(sys.argv[1]))
