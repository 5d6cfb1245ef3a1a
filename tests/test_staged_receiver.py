"""The receiving end of weight sync (what runs in each vLLM worker and in the HF engine's process), on real gloo
groups: the test thread is the trainer's rank 0, the receiver stages on its own thread, the watch reads the store."""

import threading

import pytest
import torch

from r1.distributed.bucketed_broadcast import BroadcastGroup, free_port, manifest_of
from r1.distributed.staged_receiver import StagedReceiver, SyncBroken, SyncSpec, SyncWatch

CPU = torch.device("cpu")


def _weights(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [("embed", torch.randn(40, 8, generator=gen)), ("layer.w", torch.randn(8, 8, generator=gen)),
            ("half", torch.randn(8, generator=gen).to(torch.bfloat16))]


def _group(previous=None, timeout_s: float = 30.0):
    """(sender, receiver, watch) on a fresh group; 64-byte buckets: several per version."""
    spec = SyncSpec("127.0.0.1", free_port(), 2, 1, manifest_of(_weights(0)), 64, timeout_s)
    receiver = StagedReceiver(spec, 1, backend="gloo", device=CPU, previous=previous)
    sender = BroadcastGroup(spec.host, spec.port, 0, 2, backend="gloo", timeout_s=timeout_s)
    watch = SyncWatch(spec, 1)
    watch.wait_joined(lambda: None)
    return sender, receiver, watch


def _send(sender, weights, version):
    return sender.send(weights, manifest_of(weights), 64, version)


def _equal(got, want):
    return [n for n, _ in got] == [n for n, _ in want] and all(
        a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(got, want))


def test_each_version_is_staged_bit_for_bit_and_a_load_frees_it_and_every_older_one():
    sender, receiver, watch = _group()
    v1, v2 = _weights(1), _weights(2)
    _send(sender, v1, 1)
    _send(sender, v2, 2)
    watch.wait_staged(2, lambda: None)
    watch.wait_staged(1, lambda: None)
    weights, release = receiver.take(1, timeout_s=5)
    assert _equal(weights, v1)  # a request made at version 1 runs on version 1
    memory = {t.data_ptr() for _, t in weights}
    release()  # loaded: its memory takes the next version
    assert sorted(receiver._staged) == [2]
    assert _equal(receiver.take(2, timeout_s=5)[0], v2)
    assert receiver._staged == {}
    _send(sender, v2, 2)  # what a re-formed group re-sends to a member that has it already
    watch.wait_staged(2, lambda: None)  # acknowledged...
    assert receiver._staged == {}  # ...but not staged again: no copy that nobody will load
    with pytest.raises(TimeoutError):
        receiver.take(3, timeout_s=0.2)
    _send(sender, v1, 3)
    watch.wait_staged(3, lambda: None)
    assert {t.data_ptr() for _, t in receiver._staged[3][0]} == memory  # received into version 1's buckets


def test_a_re_formed_group_keeps_what_the_old_one_staged():
    """A member of another engine died: the group is re-formed and only the newest version re-sent. A version this
    receiver staged on the old group and has not loaded yet (its requests still wait) is not lost."""
    sender_a, receiver_a, watch_a = _group()
    v1, v2 = _weights(1), _weights(2)
    _send(sender_a, v1, 1)
    watch_a.wait_staged(1, lambda: None)
    sender_b, receiver_b, watch_b = _group(previous=receiver_a)
    assert receiver_a.retired
    _send(sender_b, v2, 2)
    watch_b.wait_staged(2, lambda: None)
    assert _equal(receiver_b.take(1, timeout_s=5)[0], v1)
    assert _equal(receiver_b.take(2, timeout_s=5)[0], v2)


def test_a_failed_receive_is_reported_to_the_watch_not_waited_out():
    """A sender out of step with the manifest (here: another bucket plan) fails the member's receive; the watch
    raises SyncBroken at once instead of waiting for the version until the timeout."""
    other = [("embed", torch.zeros(40, 8)), ("layer.w", torch.zeros(8, 8))]  # fewer tensors: other buckets
    sender, receiver, watch = _group(timeout_s=3.0)
    failed_send = []
    sending = threading.Thread(target=lambda: failed_send.append(pytest.raises(RuntimeError, _send, sender, other, 1)))
    sending.start()  # (its buckets find no receiver: it fails at the group's timeout)
    with pytest.raises(SyncBroken, match="rank 1: RuntimeError: weight sync out of step"):
        watch.wait_staged(1, lambda: None)
    with pytest.raises(SyncBroken):
        receiver.take(1, timeout_s=5)[0]
    sending.join()
    assert failed_send


def test_a_member_waits_for_a_push_as_long_as_it_takes():
    """Between two pushes lies a training step, minutes at long context: more than ``sync.timeout_s``, which bounds
    a collective. Members wait for the trainer's announcement of a push, not inside the collective, so a push that
    comes later than the timeout still arrives (the receive does not fail and force a re-formed group)."""
    import time

    sender, receiver, watch = _group(timeout_s=1.0)
    time.sleep(2.5)
    v1 = _weights(1)
    _send(sender, v1, 1)
    watch.wait_staged(1, lambda: None)
    assert receiver.error is None
    assert _equal(receiver.take(1, timeout_s=5)[0], v1)
