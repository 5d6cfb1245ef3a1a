"""Which policy version a rollout worker's requests are generated with, and when staged weights are loaded.

Received weights are *staged* in the engine's members (``r1.distributed.staged_receiver``); this decides which
requests see them, on the worker's event loop:

- A request carries the policy version it was made at and starts with exactly that version: staged versions up to
  it are loaded once the requests still running an older version have finished (a request boundary).
- With ``rollout.partial_rollouts`` the newest staged version is loaded as soon as it arrives, into requests in
  flight (the engine keeps their KV cache; every token records the version that sampled it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from r1.engines.protocols import EngineDead


class VersionAdmission:
    def __init__(self, engine, partial_rollouts: bool, on_engine_dead: Callable[[BaseException], None]):
        self.engine, self.partial, self.on_engine_dead = engine, partial_rollouts, on_engine_dead
        self.staged: set[int] = set()  # versions staged in every member of the engine, not yet loaded
        self.running = 0  # requests generating now
        self.loading = False  # a version is being loaded (no token is expected meanwhile: not a stall)
        self.loads = 0  # versions loaded (a sign of progress)
        self._turn: asyncio.Condition | None = None  # made on the event loop, at first use

    def _condition(self) -> asyncio.Condition:
        if self._turn is None:
            self._turn = asyncio.Condition()
        return self._turn

    async def admit(self, version: int) -> None:
        """Start a request made at ``version``: load staged versions up to it first, once no request is still
        generating with an older one (with partial rollouts, at once: requests in flight take the update)."""
        turn = self._condition()
        async with turn:
            while self.engine.version < version and any(v <= version for v in self.staged):
                if self.running and not self.partial:
                    await turn.wait()
                    continue
                await self._load(up_to=version)
            self.running += 1

    async def finished(self) -> None:
        """A request admitted by ``admit`` is done generating (successfully or not)."""
        turn = self._condition()
        async with turn:
            self.running -= 1
            turn.notify_all()

    async def staged_version(self, version: int) -> None:
        """``version`` is staged in every member; with partial rollouts it is loaded at once."""
        self.staged.add(version)
        if self.partial:
            await self.load_newest()

    async def load_newest(self) -> int:
        """Load the newest staged version now (whatever is in flight); the version in force."""
        async with self._condition():
            return await self._load()

    async def _load(self, up_to: int | None = None) -> int:
        """Load the newest staged version that is at most ``up_to`` (None: the newest); the members free it and
        every older one. Returns the policy version now in force. Called with the condition held."""
        usable = [v for v in self.staged if up_to is None or v <= up_to]
        newest = max(usable, default=None)
        self.staged.difference_update(usable)
        if newest is not None and newest > self.engine.version:
            self.loading = True
            try:
                await self.engine.load(newest)
                self.loads += 1
            except EngineDead as err:
                self.on_engine_dead(err)
            finally:
                self.loading = False
        return self.engine.version
