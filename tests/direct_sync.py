"""The test process as the trainer's rank 0, in a sync group with one engine's members: what ``WeightSync`` forms
with the pools, minus Ray. Pushes go the production way - broadcast into the engine's own processes, staged there,
then ``load`` - so an engine test exercises the one-hop path."""

from __future__ import annotations

import asyncio
import weakref

from r1.distributed.bucketed_broadcast import BroadcastGroup, free_port, manifest_of
from r1.distributed.staged_receiver import SyncSpec

BUCKET_BYTES = int(0.05 * 2**20)  # small: several buckets even for a tiny model
# per engine object, not per id(): an id is reused once its engine is collected, and a new engine found under it
# would be taken for joined (seen: "not a member of a sync group" in a later test)
_senders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def join(engine, manifest) -> BroadcastGroup:
    host, port, world = "127.0.0.1", free_port(), 1 + engine.sync_members
    joining = asyncio.ensure_future(engine.join_sync(SyncSpec(host, port, world, 1, manifest, BUCKET_BYTES, 60.0)))
    group = await asyncio.to_thread(BroadcastGroup, host, port, 0, world, backend="gloo", timeout_s=60.0)
    await joining
    return group


async def stage(engine, named, version: int) -> int:
    """Broadcast ``named`` as ``version`` to the engine's members; returns once every one has staged it (bytes)."""
    named = list(named)
    if engine not in _senders:
        manifest = manifest_of(named)
        _senders[engine] = (await join(engine, manifest), manifest)
    group, manifest = _senders[engine]
    sent, _ = await asyncio.gather(asyncio.to_thread(group.send, named, manifest, BUCKET_BYTES, version),
                                   engine.wait_staged(version))
    return sent


async def push(engine, named, version: int) -> None:
    """Stage, then load: ``version`` is in force on return (requests in flight continue with it)."""
    await stage(engine, named, version)
    await engine.load(version)
