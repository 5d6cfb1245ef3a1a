"""Heartbeats: what the progress watchdog reads, from the workers that do the work.

A driver that waits is not a run that is stuck: during a long training step, a final evaluation, or generation at
65K tokens with one request per engine, the driver's own signs (its step, the groups delivered) stand still for
many minutes. So every worker beats on its own: a training rank once per decoder-layer forward (and per slice of an
emulated update), a rollout engine with every token it produces and every weight version it loads. A worker that is
really stuck (a hung collective, a process stopped) beats no more - and does not answer either: its last beat
stands. Each read waits at most ``timeout_s``, and never sends a worker a second question before it answered the
first (a stopped worker would otherwise collect one per read).
"""

from __future__ import annotations

import ray
import torch
from ray.exceptions import RayActorError

DEAD = "dead"


def decoder_layers(engine) -> list[torch.nn.Module]:
    """The layers of every model an engine holds (the elements of its ``ModuleList``s: decoder layers, in HF and
    Megatron alike), found through its attributes, so any engine beats without knowing of heartbeats."""
    roots = []
    for value in vars(engine).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.nn.Module):
                roots.append(item)
    layers = {id(m): m for root in roots for ml in root.modules() if isinstance(ml, torch.nn.ModuleList) for m in ml}
    return list(layers.values())


class Heartbeats:
    def __init__(self, pools: list, timeout_s: float):
        """``pools``: objects with ``actors`` (read at every call: replaced workers are followed), each actor with a
        ``heartbeat()`` method."""
        self.pools, self.timeout_s = pools, timeout_s
        self._asked: dict[object, ray.ObjectRef] = {}  # actor -> its unanswered question
        self._last: dict[object, object] = {}  # actor -> its last answer

    def read(self) -> tuple:
        actors = [a for pool in self.pools if pool is not None for a in pool.actors]
        for actor in actors:
            if actor not in self._asked:
                self._asked[actor] = actor.heartbeat.remote()
        waiting = {ref: actor for actor, ref in self._asked.items()}
        done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=self.timeout_s)
        for ref in done:
            actor = waiting[ref]
            del self._asked[actor]
            try:
                self._last[actor] = ray.get(ref)
            except RayActorError:
                self._last[actor] = DEAD
        current = set(actors)
        for gone in [a for a in self._asked if a not in current]:  # a replaced worker's question is dropped
            del self._asked[gone]
        self._last = {a: v for a, v in self._last.items() if a in current}
        return tuple(self._last.get(a) for a in actors)
