"""Trainer -> rollout weight sync: which processes take part, when the group is re-formed, what a failure means.

One hop: training rank 0 sends, and every process that holds a rollout engine's weights receives - each of vLLM's
tensor-parallel workers of every engine (the HF engine: its rollout worker's own process). Ranks: the trainer 0,
then each live engine's members in turn. The collective itself (buckets, header, gloo/NCCL group) is
``r1.distributed.bucketed_broadcast``; members stage what arrives (``r1.distributed.staged_receiver``) and the
rollout workers load it when their requests allow. A member that dies mid-broadcast takes its engine and rollout
worker down; the worker is replaced, the group re-formed and the version sent again.

Colocated engines (``rollout.placement=colocated``: engine i on training rank i's GPU) are the same group without
the collective: rank i hands its engine's members each bucket through the GPU's memory (CUDA IPC; shared memory on
CPU: ``r1.distributed.ipc_channel``), and the group's store carries the handles. Which transport is the placement's
consequence, not a choice of its own.
"""

from __future__ import annotations

import difflib

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from r1.distributed.staged_receiver import SyncSpec
from r1.workers.pools import RolloutPool, TrainPool

FORM_ATTEMPTS = 3
LIVENESS_TIMEOUT_S = 60.0  # a rollout worker that answers nothing for this long after a failed send counts as alive


class WeightSyncError(RuntimeError):
    """The trainer could not send a policy version; the rollout pool still serves the previous one."""


class WeightSync:
    """Trainer rank 0 -> every rollout worker, one bucketed broadcast per sync, on a group of its own."""

    def __init__(self, train: TrainPool, rollout: RolloutPool):
        self.train, self.rollout = train, rollout
        self.version = 0
        self.bucket_bytes = int(rollout.cfg.sync.bucket_mb * 2**20)
        self.manifest = train.manifest()  # (the members need it to join: they receive against it)
        drill = rollout.cfg.canary.drill_skip_tensor
        if drill is not None and drill not in (names := [s.name for s in self.manifest]):
            close = difflib.get_close_matches(drill, names, n=3, cutoff=0.5)
            raise ValueError(f"canary.drill_skip_tensor={drill!r} is no tensor of the pushed model (a drill that "
                             f"skips nothing proves nothing); close: {close or names[:3]}")
        self.address: tuple[str, int] | None = None  # the current group's store (what its members connect to)
        self.senders: list[int] = [0]  # the training ranks that send (colocated: each rank to its own engine)
        self._form()

    def _form(self) -> None:
        """A new group: the trainer's rank 0 and every member of every live rollout worker's engine. A rollout
        worker that dies while joining (its engine stalled or died) is replaced and the group formed again."""
        for _ in range(FORM_ATTEMPTS):
            try:
                return self._form_once()
            except RayActorError:
                dead = self._dead_members()
                if not dead:
                    raise
                self.rollout.respawn(dead)
        raise WeightSyncError(f"the sync group could not be formed in {FORM_ATTEMPTS} attempts: rollout workers "
                              "kept dying while joining it")

    def _form_once(self) -> None:
        host, port = self.address = ray.get(self.train.leader.address.remote())
        live = self.rollout.live
        widths = ray.get([self.rollout.actors[i].sync_members.remote() for i in live])
        world = 1 + sum(widths)
        firsts = [1 + sum(widths[:k]) for k in range(len(live))]
        timeout_s = self.rollout.cfg.sync.timeout_s
        if self.rollout.colocated:  # rollout worker i shares training rank i's GPU: rank i is its source
            members = {r: [] for r in range(self.train.world_size)}
            for i, first, width in zip(live, firsts, widths):
                members[i] = list(range(first, first + width))
            trainers = [a.init_sync.remote(host, port, world, members[r]) for r, a in enumerate(self.train.actors)]
            self.senders = [r for r in members if members[r]]
        else:
            trainers, self.senders = [self.train.leader.init_sync.remote(host, port, world)], [0]
        transport = "ipc" if self.rollout.colocated else "broadcast"
        drill = self.rollout.cfg.canary
        ray.get(trainers + [self.rollout.actors[i].init_sync.remote(
            SyncSpec(host, port, world, first, self.manifest, self.bucket_bytes, timeout_s, transport, source=i,
                     drill_skip_tensor=drill.drill_skip_tensor, drill_from_version=drill.drill_from_version))
            for i, first in zip(live, firsts)])

    def rejoin(self) -> None:
        """Re-form the group (a member was replaced or drained: ``r1.workers.lifecycle`` calls this) and bring every
        worker to the current version."""
        self._form()
        self.push(self.version)

    def push(self, version: int) -> int:
        """Broadcast the trainer's weights as ``version``; returns bytes sent. Every engine has them staged on
        return (loaded when a request made at that version starts). No liveness ping first: a member that died
        since the last push fails the broadcast at once, and ``broadcast`` replaces its worker and sends again."""
        return self.broadcast(version)

    def broadcast(self, version: int) -> int:
        """One bucketed broadcast. If a member dies during it, its rollout worker is replaced (the group re-formed)
        and the version sent again; receives stuck on the old group time out on their own thread. If the sender
        fails, the members would wait for buckets that never come: the group is re-formed for them and the failure
        raised at once as ``WeightSyncError``."""
        senders = self.train.broadcast_weights(version, self.senders)  # with a sharded model all ranks gather
        recvs = {self.rollout.actors[i].receive_weights.remote(version): i for i in self.rollout.live}
        pending, dead, broken, send_error, sent = [*senders, *recvs], [], False, None, 0
        while pending and not (dead or broken or send_error):
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except (RayActorError, RayTaskError) as err:
                if done[0] in senders:
                    send_error = err
                elif isinstance(err, RayActorError):
                    dead.append(recvs[done[0]])  # its engine (a member) died: the worker exited
                else:
                    broken = True  # a member's receive failed because a peer vanished mid-broadcast
                continue
            if done[0] in senders:
                sent += result
        if send_error is not None or broken:
            # a member dying also fails the sender's collective (connection reset) and other members' receives,
            # and that can arrive before its own worker has noticed: whose fault it is, the members' processes say
            dead = sorted(set(dead) | set(self._dead_members()))
        if send_error is not None and not dead:
            self._sender_failed(version, send_error)
        self.version = version
        if dead:
            self.rollout.respawn(dead)
            self.rejoin()  # the new members join, and everyone gets `version`
            return 0
        if broken:
            self.rejoin()
            return 0
        return sent

    def _dead_members(self) -> list[int]:
        """Indices of the rollout workers whose process or whose engine's member process is gone."""
        refs = {i: self.rollout.actors[i].members_alive.remote() for i in self.rollout.live}
        dead = []
        for i, ref in refs.items():
            try:
                if not ray.get(ref, timeout=LIVENESS_TIMEOUT_S):
                    dead.append(i)
            except RayActorError:
                dead.append(i)
            except GetTimeoutError:
                pass  # alive but busy
        return dead

    def _sender_failed(self, version: int, err: Exception):
        try:
            self._form()  # the rollout workers join a fresh group (their stuck receives time out on the old one)
        except (RayActorError, RayTaskError) as reform_err:
            raise WeightSyncError(
                f"the training pool failed while sending policy version {version}, and the sync group could not be "
                f"re-formed: {reform_err}") from err
        raise WeightSyncError(f"the training pool failed while sending policy version {version}: {err}") from err
