"""The rollout workers' lives: the one place that decides what happens when a worker dies, is drained, or its work
fails. GRPO's buffer, rejection sampling, evaluation and the health supervisor all go through it.

- **Replacement, once per death.** Every request is sent with a ``Ticket``: the worker index and the actor it went
  to. When a request fails because its worker died, ``lost(ticket)`` starts a fresh worker in the same bundle - only
  if the ticket's actor is still the current one. A worker with several requests in flight fails all of them; the
  first failure replaces it, the others find a replacement already there (replacing again would kill the
  replacement and the work just redone on it).
- **Redo once.** Work lost with its worker, or whose request raised, is redone once; lost a second time it is given
  up (``redo_once``): skipped and counted by the caller, never retried forever - a prompt that kills its engine or
  makes a reward raise would otherwise crash-loop the run. The losses are counted in the caller's own ``Counter``,
  so a checkpoint can keep them.
- **Membership changes are said to the sync group explicitly.** After a replacement or a drain, ``WeightSync`` (when
  the stage has a trainer) re-forms the group and brings every worker to the current policy version.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from r1.types import SamplingParams
from r1.workers.pools import split_evenly

log = logging.getLogger(__name__)

REDO_LIMIT = 1  # times a piece of lost work is done again before it is given up


@dataclass(frozen=True)
class Ticket:
    """Where a request went: the worker index and the very actor (to tell a dead worker from its replacement)."""

    worker: int
    actor: object


def failure_reason(err: BaseException) -> str:
    """A short, countable reason for a failed request (the metric's and the log's key)."""
    if isinstance(err, RayActorError):
        return "worker_lost"
    cause = err.cause if isinstance(err, RayTaskError) else err
    return f"request_error:{type(cause).__name__}"


def redo_once(losses: Counter, keys: Iterable[Hashable]) -> tuple[list, list]:
    """Count one more loss of each key; (the keys to redo, the keys given up: lost more than ``REDO_LIMIT`` times)."""
    redo, give_up = [], []
    for key in keys:
        losses[key] += 1
        (redo if losses[key] <= REDO_LIMIT else give_up).append(key)
    return redo, give_up


class WorkerLifecycle:
    """The rollout pool's membership: which workers take work, their replacement and draining, and the sync group's
    re-forming that follows (``sync``: the stage's ``WeightSync``; None where no trainer sends weights)."""

    def __init__(self, pool, sync=None):
        self.pool, self.sync = pool, sync

    @property
    def live(self) -> list[int]:
        return self.pool.live

    def submit(self, worker: int, problems, params: SamplingParams, uids: list[int], version: int):
        """A generation request on ``worker`` (``RolloutPool.submit``); (its ObjectRef, its Ticket)."""
        return self.pool.submit(worker, problems, params, uids, version), self.ticket(worker)

    def ticket(self, worker: int) -> Ticket:
        return Ticket(worker, self.pool.actors[worker])

    def lost(self, ticket: Ticket) -> bool:
        """A request on ``ticket`` failed because its worker died: replace the worker unless that was done already
        (a sibling request's failure) or it was drained. True if this call replaced it."""
        if self.pool.actors[ticket.worker] is not ticket.actor or ticket.worker in self.pool.drained:
            return False
        self.pool.respawn([ticket.worker])
        self._membership_changed()
        return True

    def drain(self, index: int) -> None:
        """No more work for worker ``index`` (its GPU is sick): stopped and not replaced. Its requests in flight fail
        and are redone on the others by whoever sent them."""
        log.warning("rollout worker %d drained (health); the pool goes on with workers %s", index,
                    [i for i in self.live if i != index])
        self.pool.retire(index)
        if self.live:
            self._membership_changed()

    def _membership_changed(self) -> None:
        if self.sync is not None:
            self.sync.rejoin()

    def evaluate(self, problems: list[tuple[int, str, object]], params: SamplingParams, version: int) -> list[dict]:
        """Evaluation: one chunk per live worker, queued behind the generation requests already sent, with policy
        ``version``. A chunk whose worker dies or whose request fails is redone once; lost again, its problems come
        back as ``{"skipped": reason}`` rows (counted by ``summarize``)."""
        chunks = split_evenly(problems, len(self.live))
        results: dict[int, list] = {}
        losses: Counter = Counter()
        todo = [i for i, c in enumerate(chunks) if c]
        while todo:
            sent = {}
            live = self.live  # (a drained worker's chunk is redone on another)
            for i in todo:
                worker = live[i % len(live)]
                chunk_params = replace(params, seed=params.seed * 1009 + i)  # a chunk's seed never depends on who runs it
                sent[i] = (self.pool.actors[worker].evaluate.remote(chunks[i], chunk_params, version),
                           self.ticket(worker))
            todo = []
            for i, (ref, ticket) in sent.items():
                try:
                    results[i] = ray.get(ref)
                except (RayActorError, RayTaskError) as err:
                    reason = failure_reason(err)
                    if isinstance(err, RayActorError):
                        self.lost(ticket)
                    if redo_once(losses, [i])[0]:
                        todo.append(i)
                    else:
                        log.error("evaluation: %d problems lost twice (%s); skipped", len(chunks[i]), reason)
                        results[i] = [{"skipped": reason} for _ in chunks[i]]
        return [row for i in sorted(results) for row in results[i]]
