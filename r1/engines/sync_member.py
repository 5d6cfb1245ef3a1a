"""What every rollout engine does as a member of the weight-sync group, whatever holds its weights.

An engine contributes ``sync_members`` ranks (vLLM: one per tensor-parallel worker; HF: its own process), joins a
(re-formed) group with ``join_sync``, reports a version staged in every member with ``wait_staged`` and loads it with
``load``. The engine says how it joins and loads (``_join``, ``_load``, ``_check_alive``); the waiting is shared.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

from r1.distributed.staged_receiver import SyncBroken, SyncSpec, SyncWatch
from r1.engines.protocols import EngineDead


class SyncMember(ABC):
    sync_members: int = 1
    _watch: SyncWatch | None = None
    _joins: int = 0  # join_sync calls so far: a wait for an older group's members gives up when a newer one starts
    _waits: ThreadPoolExecutor | None = None

    async def _off_loop(self, fn, *args):
        """Run a blocking wait on this engine's own sync threads. Not ``asyncio.to_thread``: the loop's default
        executor also runs generation calls queued behind each other (the HF engine), and a push must not wait for
        them to finish before it is even noticed (found by the partial-rollouts test)."""
        if self._waits is None:
            self._waits = ThreadPoolExecutor(max_workers=4, thread_name_prefix="r1-sync-wait")
        return await asyncio.get_running_loop().run_in_executor(self._waits, fn, *args)

    @abstractmethod
    async def _join(self, spec: SyncSpec) -> None:
        """Start this engine's members joining ``spec``'s group (returns before they have joined)."""

    @abstractmethod
    async def load(self, version: int) -> None:
        """Make the staged ``version`` the one in force; requests in flight continue (their KV cache kept)."""

    def _check_alive(self) -> None:
        """Raise ``EngineDead`` if the engine or one of its member processes is gone."""

    async def join_sync(self, spec: SyncSpec) -> None:
        """Join a (re-formed) sync group; returns once every member has joined. A wait on the previous group ends
        with ``SyncBroken``."""
        self._watch = None
        self._joins += 1
        this_join = self._joins

        def alive():
            if self._joins != this_join:
                raise SyncBroken("a newer sync group was formed while joining this one")
            self._check_alive()

        await self._join(spec)
        watch = await self._off_loop(SyncWatch, spec, self.sync_members)  # (connecting to the store blocks)
        await self._off_loop(watch.wait_joined, alive)
        if self._joins == this_join:
            self._watch = watch

    async def wait_staged(self, version: int) -> None:
        """Returns once ``version`` is staged in every member; ``EngineDead`` if a member died meanwhile,
        ``SyncBroken`` if the broadcast failed for another reason (or the group was re-formed)."""
        watch = self._watch
        if watch is None:
            raise SyncBroken("not a member of a sync group")

        def alive():
            if self._watch is not watch:
                raise SyncBroken("the sync group was re-formed during the broadcast")
            self._check_alive()

        await self._off_loop(watch.wait_staged, version, alive)

    def members_alive(self) -> bool:
        try:
            self._check_alive()
        except EngineDead:
            return False
        return True
