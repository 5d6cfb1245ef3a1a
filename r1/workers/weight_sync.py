"""Trainer -> rollout weight sync: which actors take part, when the group is re-formed, what a failure means.

The collective itself (buckets, header, gloo/NCCL group) is ``r1.distributed.bucketed_broadcast``; this module is the
orchestration around it: training rank 0 sends, every rollout worker receives, and a worker that dies mid-broadcast
is replaced and brought up to date.
"""

from __future__ import annotations

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from r1.workers.pools import RolloutPool, TrainPool

LIVENESS_TIMEOUT_S = 60.0  # a rollout worker that answers nothing for this long after a failed send counts as alive


class WeightSyncError(RuntimeError):
    """The trainer could not send a policy version; the rollout pool still serves the previous one."""


class WeightSync:
    """Trainer rank 0 -> every rollout worker, one bucketed broadcast per sync, on a group of its own."""

    def __init__(self, train: TrainPool, rollout: RolloutPool):
        self.train, self.rollout = train, rollout
        self.version = 0
        rollout.sync = self
        self._form()
        self.manifest = train.manifest()

    def _form(self) -> None:
        host, port = ray.get(self.train.leader.address.remote())
        live = self.rollout.live
        world = 1 + len(live)
        ray.get(
            [self.train.leader.init_sync.remote(host, port, world)]
            + [self.rollout.actors[i].init_sync.remote(host, port, rank + 1, world) for rank, i in enumerate(live)]
        )

    def rejoin(self) -> None:
        """Re-form the group (a member was replaced) and bring every worker to the current version."""
        self._form()
        self.push(self.version)

    def push(self, version: int) -> int:
        """Broadcast the trainer's weights as ``version``; returns bytes sent. Every worker has them staged on
        return (loaded when a request made at that version starts). No liveness ping first: a worker that died
        since the last push fails its receive at once, and ``broadcast`` replaces it and sends again."""
        return self.broadcast(version)

    def broadcast(self, version: int) -> int:
        """One bucketed broadcast. If a receiver dies during it, the group is re-formed at once (the dead one
        replaced) and the version sent again; receives stuck on the old group time out on their own thread. If the
        sender fails, the receivers would wait for buckets that never come: the group is re-formed for them and
        the failure raised at once as ``WeightSyncError``."""
        senders = self.train.broadcast_weights(version)  # rank 0 sends; with a sharded model all ranks gather
        recvs = {self.rollout.actors[i].receive_weights.remote(self.manifest, version): i for i in self.rollout.live}
        pending, dead, broken, sent = [*senders, *recvs], [], False, 0
        while pending and not (dead or broken):
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except (RayActorError, RayTaskError) as err:
                if done[0] in senders:
                    # A receiver dying mid-broadcast also fails the sender's collective (connection reset), and that
                    # error can arrive before Ray reports the death: a failed send is the sender's fault only if
                    # every receiver is still alive.
                    dead = self._dead_receivers() if isinstance(err, RayTaskError) else []
                    if not dead:
                        self._sender_failed(version, err)
                    continue
                if isinstance(err, RayActorError):
                    dead.append(recvs[done[0]])
                else:
                    broken = True  # a survivor's receive failed because a peer vanished mid-broadcast
                continue
            if done[0] == senders[0]:
                sent = result
        self.version = version
        if dead:
            self.rollout.replace(dead)  # re-forms the group and pushes `version` to everyone
            return 0
        if broken:
            self.rejoin()
            return 0
        return sent

    def _dead_receivers(self) -> list[int]:
        """Indices of the rollout workers whose process is gone (asked only after a failed send)."""
        refs = {i: self.rollout.actors[i].pid.remote() for i in self.rollout.live}
        dead = []
        for i, ref in refs.items():
            try:
                ray.get(ref, timeout=LIVENESS_TIMEOUT_S)
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
