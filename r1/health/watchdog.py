"""The driver's progress watchdog: a thread that notices when a run stops moving.

Progress is any change in what ``signs()`` returns (the driver's step, the groups the rollout pool delivered, and
every worker's heartbeat: ``r1.health.heartbeat``): a run whose training hangs in a collective, or whose rollout
engines all stopped producing, shows the same signs for ``stall_s``; a long training step or evaluation does not. Then ``on_stall(idle_s)`` runs once, on this thread (the driver's
own thread is the one that is stuck); after progress resumes it may fire again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ProgressWatchdog:
    def __init__(self, stall_s: float, signs: Callable[[], object], on_stall: Callable[[float], None]):
        self.stall_s, self.signs, self.on_stall = stall_s, signs, on_stall
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="r1-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        last, since, fired = self.signs(), time.monotonic(), False
        while not self._stop.wait(min(self.stall_s / 4, 30.0)):
            now = self.signs()
            if now != last:
                last, since, fired = now, time.monotonic(), False
            elif not fired and (idle := time.monotonic() - since) >= self.stall_s:
                fired = True
                self.on_stall(idle)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
