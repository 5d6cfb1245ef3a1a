"""Ctrl-C / SIGTERM / SIGUSR1 as a request, not a crash: finish the step in progress, checkpoint, stop both pools.

A second signal aborts at once (KeyboardInterrupt). Slurm and Kubernetes send SIGTERM before killing a job, so a
pre-empted run leaves a checkpoint it can resume from. SIGUSR1 is the warning a Slurm job asks for before its time
limit or a preemption (``--signal=B:USR1@<s>``): the job then requeues itself (``launcher/slurm_job.py``).
``abort`` is the same request from inside the run (a sick GPU, a stalled run: ``r1.health``); such a run exits with
``REQUEUE_EXIT``. ``halt`` stops the same way for a fault a restart cannot cure (the mismatch canary: the engines
disagree about the weights): exit ``HALT_EXIT``, not requeued, a person looks first.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Self

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
REQUEUE_EXIT = 75  # "try again later" (sysexits' EX_TEMPFAIL): a Slurm job requeues itself on it
HALT_EXIT = 70  # "internal software error" (EX_SOFTWARE): checkpointed, stopped, never requeued


def exit_code(result: dict) -> int:
    """The exit code of a finished run (what ``r1.stages.run`` returned), the same under every launcher (local,
    Slurm, Kubernetes): 0 when it completed; ``REQUEUE_EXIT`` when it checkpointed and must run again - it aborted
    itself (a sick GPU, a stall: ``result["aborted"]``) or was warned of its end (SIGUSR1: a time limit or a
    preemption ahead); 128 + the signal that stopped it otherwise. A run that aborted must never look finished: a
    Kubernetes RayJob that exits 0 is SUCCEEDED and never retried, and training would have stopped in silence."""
    if result.get("halted"):
        return HALT_EXIT
    if result.get("aborted"):
        return REQUEUE_EXIT
    stopped_by = result.get("stopped_by")
    if stopped_by == signal.SIGUSR1:
        return REQUEUE_EXIT
    return 128 + int(stopped_by) if stopped_by else 0


class GracefulStop:
    def __init__(self):
        self.signum: int | None = None
        self.aborted: dict | None = None  # what made the run abort itself (an incident)
        self.halted: dict | None = None  # what made the run halt itself (an incident no restart cures)
        self.reason = ""
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.aborted is not None or self.halted is not None

    def halt(self, reason: str, details: dict) -> None:
        """Stop after the current step, checkpoint, exit with ``HALT_EXIT``: not to be requeued."""
        if not self.requested:
            self.reason, self.halted = reason, details
            log.error("%s: stopping after the current step (checkpoint, then exit %d; not requeued)", reason,
                      HALT_EXIT)

    def abort(self, reason: str, details: dict) -> None:
        """Stop after the current step, checkpoint, exit with ``REQUEUE_EXIT`` (any thread may call it)."""
        if not self.requested:
            self.reason, self.aborted = reason, details
            log.error("%s: stopping after the current step (checkpoint, then exit %d to be requeued)", reason,
                      REQUEUE_EXIT)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.signum, self.reason = signum, signal.Signals(signum).name
        log.warning("%s received: stopping after the current step (checkpoint, then shut down both pools); "
                    "send it again to abort now", signal.Signals(signum).name)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
