"""Ctrl-C / SIGTERM / SIGUSR1 as a request, not a crash: finish the step in progress, checkpoint, stop both pools.

A second signal aborts at once (KeyboardInterrupt). Slurm and Kubernetes send SIGTERM before killing a job, so a
pre-empted run leaves a checkpoint it can resume from. SIGUSR1 is the warning a Slurm job asks for before its time
limit or a preemption (``--signal=B:USR1@<s>``): the job then requeues itself (``launcher/slurm_job.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Self

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class GracefulStop:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.signum = signum
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
