"""Asynchronous GRPO on real Ray pools: the staleness bound, nothing lost or repeated, faults and clean stops.

Decode and update latencies are emulated (``rollout.simulated_decode_step_s``, ``trainer.simulated_update_s``) so
that generation and training really overlap on a 2-core machine; the tests assert what happened, never how fast.
"""

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest.mock import ANY

import psutil
import pytest
import ray
import torch

from r1.algo import GRPOLoss
from r1.data.prompts import PromptSampler
from r1.data.tokens import TokenRules
from r1.driver import build_batch, make_loss, run, sampling_params, train_on
from r1.inputs import prepare_data
from r1.monitoring.ledger import read_ledger
from r1.types import Reference, SamplingParams, collate
from r1.workers.lifecycle import WorkerLifecycle
from r1.workers.rollout_buffer import outstanding_uids
from tests.conftest import REPO, TINY, compose, pools

pytestmark = pytest.mark.slow

P = 4  # prompts per step

ASYNC = [
    "trainer.num_workers=1", "rollout.num_workers=2", "algo.group_size=2", f"algo.prompts_per_step={P}",
    "eval.at_start=false", "eval.every_steps=0", "eval.k=1", "eval.max_problems=2", "eval.max_new_tokens=8",
    "rollout.length_schedule=[{from_step: 0, max_tokens: 8}]", "checkpoint.every_steps=0", "trainer.lr=1e-3",
]


def _overrides(cache_dir, run_dir, total_steps, *extra):
    return TINY + ASYNC + [f"cache_dir={cache_dir}", f"run_dir={run_dir}", f"trainer.total_steps={total_steps}",
                           *extra]


def _step_metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "reward/mean" in m]


def assert_every_group_trained_once(run_dir, buffer_state, total_steps):
    """The no-loss, no-duplicate guarantee: every drawn uid is trained exactly once or still outstanding."""
    trained = [r["uid"] for r in read_ledger(run_dir)]
    pending = outstanding_uids(buffer_state)
    assert len(trained) == len(set(trained)) == total_steps * P, "a group was trained twice or lost"
    assert not set(trained) & set(pending)
    assert set(trained) | set(pending) == set(range(buffer_state["next_uid"])), "a drawn prompt vanished"


def test_on_policy_async_loop_is_the_synchronous_loop(ray_local, tiny_model, cache_dir, tmp_path):
    """max_staleness=0 through the buffer == the textbook loop, written out here from the paper and the documented
    contract rather than the driver's helpers: each step draws P prompts, asks the pool for G samples of each at the
    current version (a request's seed: ``seed * 1_000_003 + first uid * 7_919 + attempt``, docs/async.md), takes
    GRPO's advantages (r - mean_g) / (std_g + 1e-6) (DeepSeekMath eq. 3, unbiased std), one PPO-clip update with
    k3 KL to the reference in the loss, then pushes the weights."""
    cfg = compose(_overrides(cache_dir, tmp_path / "async0", 3, "algo.max_staleness=0",  # (rewards that differ
                             "reward.terms=[{name: 'tests.test_end_to_end:digit_reward', weight: 1.0}]")) # in a group)
    run(cfg)
    driver = _step_metrics(tmp_path / "async0")
    a, G = cfg.algo, cfg.algo.group_size
    assert (a.minibatches_per_step, a.kl_placement, a.std_normalize, a.filter_uniform_groups) == (1, "loss", True,
                                                                                                  False)
    loss = GRPOLoss(clip_low=a.clip_low, clip_high=a.clip_high, agg=a.loss_agg, kl_coef=a.kl_coef,
                    kl_kind=a.kl_kind, kl_in_loss=True, temperature=cfg.rollout.temperature, norm_constant=8.0,
                    is_level="token", is_cap=a.is_cap)  # (norm_constant: the one length stage's 8 tokens)

    with pools(cfg, tiny_model) as (train, rollout, sync):
        problems = prepare_data(cfg)[0].problems
        sampler = PromptSampler(len(problems), cfg.seed)
        per_request = math.ceil(P / len(rollout.actors))
        pad_id = TokenRules.load(tiny_model).pad_id
        for step in range(3):
            indices, uids = sampler.next_indices(P), list(range(step * P, (step + 1) * P))
            refs = []
            for r, start in enumerate(range(0, P, per_request)):
                chunk = list(zip(uids, indices))[start:start + per_request]
                params = SamplingParams(n=G, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                        max_new_tokens=8, seed=cfg.seed * 1_000_003 + chunk[0][0] * 7_919)
                todo = [(i, problems[i].prompt, problems[i].reference) for _, i in chunk]
                refs.append(rollout.submit(r % len(rollout.actors), todo, params, [u for u, _ in chunk], step))
            groups = [g for ref in refs for g in ray.get(ref).groups]
            assert all(g.policy_version == step for g in groups) and [g.uid for g in groups] == uids
            rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])  # [P, G]
            assert (rewards.std(1) > 0).any()  # (advantages that are not all zero: the update depends on them)
            advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
            stats = train.train_step(collate(groups, advantages.reshape(-1), pad_id), loss)
            sync.push(step + 1)
            assert driver[step]["reward/mean"] == pytest.approx(float(rewards.mean()), rel=1e-6)
            # (the driver's update takes the rows in a seeded shuffle: the same sums in another order. The loss is
            # ~0 by construction - advantages sum to zero in a group and the ratio is 1 - so it is compared to
            # absolute noise; the gradient, which does not cancel, to relative.)
            assert driver[step]["train/loss"] == pytest.approx(stats["loss"], abs=1e-6)
            assert driver[step]["train/grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-4)
            assert stats["grad_norm"] > 1e-3
            assert driver[step]["staleness/max"] == 0


@pytest.mark.parametrize("staleness", [1, 2])
def test_staleness_bound_and_no_group_lost_or_repeated(ray_local, tiny_model, cache_dir, tmp_path, staleness):
    run_dir = tmp_path / f"s{staleness}"
    out = run(compose(_overrides(
        cache_dir, run_dir, 5, f"algo.max_staleness={staleness}", "rollout.groups_per_request=1",
        "rollout.simulated_decode_step_s=0.02", "trainer.simulated_update_s=0.3",
    )))
    ledger = read_ledger(run_dir)
    assert max(r["staleness"] for r in ledger) <= staleness  # each group's oldest token, so every sample
    assert max(r["staleness"] for r in ledger) >= 1, "generation never overlapped training"
    assert_every_group_trained_once(run_dir, out["buffer"], 5)
    metrics = _step_metrics(run_dir)
    for m in metrics:
        assert m["staleness/max"] <= staleness
        assert sum(m[f"staleness/frac_{k}"] for k in range(staleness + 1)) == pytest.approx(1.0)
        for key in ("train/is_weight_mean", "train/is_weight_max", "train/is_clipped_fraction",
                    "time/rollout_idle_s", "time/train_idle_s", "perf/overlap_efficiency",
                    "buffer/discarded_stale_total"):
            assert key in m, key
    # the canary's probes: the trainer's half at each push, the engines' answers collected when in (no waiting)
    probed = [(m["canary/probe_version"], m["policy/version"], m["canary/probe_logp_diff_mean"]) for m in metrics
              if "canary/probe_version" in m]
    assert probed and all(v <= now and gap < 1e-3 for v, now, gap in probed)
    assert [v for v, _, _ in probed] == sorted({v for v, _, _ in probed})


def test_partial_rollouts_mix_versions_within_the_bound(ray_local, tiny_model, cache_dir, tmp_path):
    run_dir = tmp_path / "partial"
    out = run(compose(_overrides(
        cache_dir, run_dir, 4, "algo.max_staleness=1", "rollout.partial_rollouts=true",
        "rollout.length_schedule=[{from_step: 0, max_tokens: 24}]", "rollout.simulated_decode_step_s=0.03",
    )))
    metrics = _step_metrics(run_dir)
    assert max(m["rollout/partial_samples_fraction"] for m in metrics) > 0, "no request saw a weight update"
    assert max(r["staleness"] for r in read_ledger(run_dir)) <= 1
    assert_every_group_trained_once(run_dir, out["buffer"], 4)


def _generating_rollout_workers():
    """Rollout worker processes (asyncio actors, titled ``ray::RolloutWorker``). After the first step of an async
    run with one group per request every worker has requests in flight: the decode is slowed to 50 ms a token.
    Only this test process's own Ray is searched: a test running beside it (pytest-xdist) has workers of its own."""
    procs = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(p.cmdline()).startswith("ray::RolloutWorker"):
                procs.append(p)
    return procs


def test_killed_rollout_worker_is_replaced_and_its_groups_redone_once(ray_local, tiny_model, cache_dir, tmp_path):
    run_dir = tmp_path / "kill"
    killed = []

    def kill_one_mid_generation():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if (run_dir / "metrics.jsonl").exists() and _step_metrics(run_dir):
                for proc in _generating_rollout_workers()[:1]:
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_mid_generation, daemon=True)
    killer.start()
    out = run(compose(_overrides(
        cache_dir, run_dir, 5, "algo.max_staleness=1", "rollout.groups_per_request=1",
        "rollout.simulated_decode_step_s=0.05",
    )))
    killer.join(timeout=5)
    assert killed, "no rollout worker was caught generating"
    last = _step_metrics(run_dir)[-1]
    assert last["rollout/workers_replaced_total"] >= 1
    assert last["buffer/redone_after_worker_loss_total"] >= 1
    assert_every_group_trained_once(run_dir, out["buffer"], 5)
    assert max(r["staleness"] for r in read_ledger(run_dir)) <= 1


def _launch(args, **kw):
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen([sys.executable, "-m", "launcher.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_checkpoints_stops_everything_and_resume_loses_nothing(tiny_model, cache_dir, tmp_path):
    run_dir = tmp_path / "term"
    args = _overrides(cache_dir, run_dir, 6, "algo.max_staleness=1", "rollout.groups_per_request=1",
                      "rollout.simulated_decode_step_s=0.05", "trainer.simulated_update_s=0.2")
    proc = _launch(args)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(_step_metrics(run_dir)) >= 2):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any("RolloutWorker" in " ".join(p.cmdline()) for p in tree if p.is_running())
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output

    # nothing left behind: every process the run started is gone
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, [" ".join(p.cmdline()) for p in alive]

    # the checkpoint is at the step the run stopped at, with the in-flight groups recorded as pending
    stopped_at = _step_metrics(run_dir)[-1]["step"]
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "driver_state.json").read_text())
    assert state["step"] == stopped_at < 6
    assert outstanding_uids(state["buffer"]), "an async run stops with groups in flight"

    resumed = _launch(args + ["resume=true"])
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    final = json.loads((run_dir / "checkpoints" / "step_000006" / "driver_state.json").read_text())
    assert_every_group_trained_once(run_dir, final["buffer"], 6)
    assert max(r["staleness"] for r in read_ledger(run_dir)) <= 1


def test_a_dead_workers_evaluation_chunk_is_redone_and_a_death_during_a_broadcast_resends_the_version(
        ray_local, tiny_model, cache_dir, tmp_path):
    """(One pool for both faults: each pool start costs the suite ~15 s.)"""
    cfg = compose(_overrides(cache_dir, tmp_path / "eval", 1, "sync.timeout_s=600"))
    with pools(cfg, tiny_model) as (_, rollout, sync):
        os.kill(ray.get(rollout.actors[0].pid.remote()), signal.SIGKILL)
        problems = [(i, p.prompt, p.reference) for i, p in enumerate(prepare_data(cfg)[1].problems[:4])]
        too_long = (4, "Compute " + " + ".join(["1"] * 300), Reference("300"))  # beyond the model's 256 positions
        rows = WorkerLifecycle(rollout, sync).evaluate([*problems, too_long], sampling_params(cfg, 0, seed=5), 0)
        assert len(rows) == 5 and rollout.replaced == 1
        assert all("pass1" in r for r in rows[:4]) and rows[4] == {"skipped": "prompt_too_long"}
        # the replacement joined the re-formed sync group: a push reaches it (it now generates as version 1) and
        # leaves it bit-identical to the surviving worker
        sync.push(1)
        [group] = ray.get(rollout.submit(0, problems[:1], sampling_params(cfg, 1, seed=6), [0], 1)).groups
        assert group.policy_version == 1
        new, old = ray.get([a.loaded_weights.remote() for a in rollout.actors])
        assert [n for n, _ in new] == [n for n, _ in old]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(new, old))

        # a worker dying before a broadcast: no liveness check first, the death surfaces inside the collective; its
        # worker is replaced and the version sent again
        os.kill(ray.get(rollout.actors[1].pid.remote()), signal.SIGKILL)
        sync.broadcast(2)
        assert rollout.replaced == 2
        results = ray.get([rollout.submit(w, problems[w:w + 1], sampling_params(cfg, 2, seed=w), [w], 2)
                           for w in range(2)])
        assert [g.policy_version for r in results for g in r.groups] == [2, 2]

        # a weight load slower than rollout.stall_timeout_s is no engine stall (no token is due while weights load):
        # the worker's own watchdog used to take it for one and kill the worker
        def slow_loads(worker):
            worker.cfg.rollout.stall_timeout_s = 1.0
            load = worker.engine.load

            async def slow(version):
                await asyncio.sleep(3)
                await load(version)

            worker.engine.load = slow

        ray.get(rollout.actors[0].__ray_call__.remote(slow_loads))
        time.sleep(1.5)  # (the watchdog reads the timeout once a second)
        sync.push(3)
        [group] = ray.get(rollout.submit(0, problems[:1], sampling_params(cfg, 3, seed=7), [0], 3)).groups
        assert group.policy_version == 3 and rollout.replaced == 2
        assert ray.get(rollout.actors[0].heartbeat.remote())[1] >= 1  # (it loaded: a sign of progress)


def test_groups_older_than_the_bound_are_discarded_and_regenerated_first(ray_local, tiny_model, cache_dir, tmp_path):
    from r1.workers.rollout_buffer import RolloutBuffer

    cfg = compose(_overrides(cache_dir, tmp_path / "stale", 1, "algo.max_staleness=1"))
    with pools(cfg, tiny_model) as (_, rollout, sync):
        problems = prepare_data(cfg)[0].problems
        buffer = RolloutBuffer(cfg, WorkerLifecycle(rollout, sync), problems, PromptSampler(len(problems), cfg.seed),
                               lambda version, seed: sampling_params(cfg, version, seed))
        buffer.fill(0)  # two batches' worth, requested at (and generated with) version 0
        for version in (1, 2, 3):  # the trainer moves on before they are taken
            sync.push(version)
        batch = buffer.take(3).groups
        assert [g.uid for g in batch] == list(range(P))  # regenerated first, in order
        assert all(g.policy_version == 3 for g in batch)
        assert outstanding_uids(buffer.state_dict()) == list(range(P, 2 * P))
        batch = buffer.take(3).groups
        assert [g.uid for g in batch] == list(range(P, 2 * P)) and all(g.policy_version == 3 for g in batch)
        assert buffer.discarded_stale == 2 * P  # every version-0 group, once

        # the counters and each outstanding uid's attempt number survive a checkpoint (a regenerated prompt must
        # not repeat its first seed, totals must not restart at zero)
        buffer.fill(3)
        buffer.settle(4)  # two batches of version 3, ready
        for version in (4, 5):
            sync.push(version)
        # the oldest is too old: discarded and re-requested (attempt 1); the scan waits for it, and a stop comes
        assert buffer.take(5, stop_requested=lambda: True) is None
        state = json.loads(json.dumps(buffer.state_dict()))  # as the checkpoint stores it
        assert outstanding_uids(state) == list(range(2 * P, 4 * P)) and state["requests"] == [[[2 * P, ANY]]]
        assert state["attempts"] == [[2 * P, 1]] and state["discarded_stale"] == 2 * P + 1
        buffer.save_groups(tmp_path)
        restored = RolloutBuffer(cfg, WorkerLifecycle(rollout, sync), problems, PromptSampler(len(problems), cfg.seed),
                                 lambda version, seed: sampling_params(cfg, version, seed))
        restored.load_state_dict(state, tmp_path)
        assert restored.state_dict() == state


def parity_reward(response: str, reference: str) -> float:
    """Uniform (all 0) for prompts whose answer is even; varies with the response for odd answers."""
    return 0.0 if int(reference) % 2 == 0 else float(len(response) % 2)


def zero_reward(response: str, reference: str) -> float:
    return 0.0


def length_reward(response: str, reference: str) -> float:
    """Differs between samples from the start (an untrained tiny model never earns accuracy or format)."""
    return len(response) / 64


RAISING_ANSWER = "777"


def raising_reward(response: str, reference: str) -> float:
    """A user's reward code with a bug that one problem (answer 777) triggers."""
    if reference == RAISING_ANSWER:
        raise ValueError("a bug in the reward code")
    return len(response) / 64


def test_a_problem_whose_reward_raises_is_skipped_and_one_beyond_the_context_dropped(ray_local, tiny_model,
                                                                                       cache_dir, tmp_path):
    """A reward term that raises on one problem's responses: that problem is skipped and counted with its reason
    each time it is drawn (its request's other problems are trained on), never retried forever; a prompt longer
    than the engine's context is dropped at load and counted. The run completes."""
    rows = [{"prompt": f"Compute {a} + {b} + {c} + {d}", "answer": str(a + b + c + d)}
            for a, b, c, d in [(1, 2, 3, 4), (2, 2, 2, 2), (5, 1, 0, 3), (4, 4, 1, 0), (3, 3, 3, 1)]]
    rows.insert(2, {"prompt": "Compute 700 + 77", "answer": RAISING_ANSWER})
    rows.append({"prompt": "Compute " + " + ".join(["1"] * 300), "answer": "300"})  # beyond 256 positions
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "skip"
    out = run(compose(_overrides(
        cache_dir, run_dir, 3, f"data.train_path={data}", f"data.eval_path={data}", "data.generator=null",
        "reward.terms=[{name: 'tests.test_async:raising_reward', weight: 1.0}]")))
    assert out["step"] == 3
    metrics = _step_metrics(run_dir)
    assert {m["data/prompts_too_long"] for m in metrics} == {1}
    # which uid drew which problem: the sampler over the 6 problems that fit, in uid order
    drawn = PromptSampler(6, 0).next_indices(out["buffer"]["next_uid"])
    trained = {r["uid"] for r in read_ledger(run_dir)}
    skipped = set(range(len(drawn))) - trained - set(outstanding_uids(out["buffer"]))
    assert skipped and skipped == {u for u in range(len(drawn)) if drawn[u] == 2} - set(outstanding_uids(out["buffer"]))
    assert metrics[-1]["buffer/skipped/reward_error:ValueError"] == metrics[-1]["buffer/skipped_total"] == len(skipped)
    assert out["buffer"]["skipped"] == {"reward_error:ValueError": len(skipped)}
    assert all(r["prompt_index"] != 2 for r in read_ledger(run_dir))


def test_dynamic_sampling_refills_the_batch_with_groups_that_carry_signal(ray_local, tiny_model, cache_dir,
                                                                          tmp_path):
    run_dir = tmp_path / "dapo"
    out = run(compose(_overrides(
        cache_dir, run_dir, 3, "algo=dapo", f"algo.prompts_per_step={P}", "algo.group_size=4",
        "algo.max_staleness=1", "algo.max_sampling_rounds=6", "algo.overlong_buffer_share=0",  # (rewards 0 or 1)
        "reward.terms=[{name: 'tests.test_async:parity_reward', weight: 1.0}]",
    )))
    ledger = read_ledger(run_dir)
    trained = [r for r in ledger if r["trained"]]
    dropped = [r for r in ledger if not r["trained"]]
    assert dropped, "no group was uniform: the test's reward should make about half of them so"
    for step in (1, 2, 3):  # a full batch each step, and only groups whose rewards differ
        assert len([r for r in trained if r["step"] == step]) == P
    assert all(0.0 < r["reward_mean"] < 1.0 for r in trained)
    assert all(r["reward_mean"] in (0.0, 1.0) for r in dropped)
    metrics = _step_metrics(run_dir)
    assert sum(m["algo/groups_examined"] for m in metrics) == len(ledger) > 3 * P
    assert metrics[-1]["algo/groups_dropped_uniform_total"] == len(dropped)
    assert [m["policy/version"] for m in metrics] == [1, 2, 3]
    consumed = [r["uid"] for r in ledger]  # every drawn uid consumed once (trained or dropped) or still owed
    assert len(consumed) == len(set(consumed))
    assert set(consumed) | set(outstanding_uids(out["buffer"])) == set(range(out["buffer"]["next_uid"]))


def test_dynamic_sampling_that_drops_everything_makes_no_update(ray_local, tiny_model, cache_dir, tmp_path):
    """Every group uniform: each step examines max_sampling_rounds batches' worth, then skips the update -- no
    optimizer step, no new policy version, no weight push -- and the run goes on."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "nothing"
    out = run(compose(_overrides(
        cache_dir, run_dir, 2, "algo=dapo", f"algo.prompts_per_step={P}", "algo.max_sampling_rounds=2",
        "algo.overlong_buffer_share=0",  # (DAPO's length penalty would make the groups' rewards differ)
        "reward.terms=[{name: 'tests.test_async:zero_reward', weight: 1.0}]",
    )))
    metrics = _step_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and out["version"] == 0
    for m in metrics:
        assert m["train/optimizer_steps"] == 0 and m["policy/version"] == 0 and m["perf/sync_MB"] == 0
        assert m["algo/groups_examined"] == 2 * P and m["algo/groups_dropped_uniform"] == 2 * P
        assert not any(k.startswith("train/") and k != "train/optimizer_steps" for k in m)
    assert all(not r["trained"] and r["version"] == 0 for r in read_ledger(run_dir))  # generated by version 0 only
    final = load_file(str(run_dir / "checkpoints" / "step_000002" / "policy" / "model.safetensors"))
    initial = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert all(torch.equal(final[n], initial[n]) for n in final)


def test_a_failing_sender_fails_the_push_at_once_and_the_pool_rejoins(ray_local, tiny_model, cache_dir, tmp_path):
    """Trainer rank 0 raises before its first bucket (a device fault, say): receivers would wait for the header
    until sync.timeout_s (600 s here). The push fails at once naming the cause; the next push works."""
    from r1.workers.weight_sync import WeightSyncError

    cfg = compose(_overrides(cache_dir, tmp_path / "sender", 1, "sync.timeout_s=600"))

    def break_weights(worker):
        def fault():
            raise RuntimeError("simulated device fault while gathering weights")
        worker.engine.named_weights = fault

    with pools(cfg, tiny_model) as (train, rollout, sync):
        ray.get(train.leader.__ray_call__.remote(break_weights))
        with pytest.raises(WeightSyncError, match="simulated device fault"):
            sync.push(1)
        ray.get(train.leader.__ray_call__.remote(lambda worker: delattr(worker.engine, "named_weights")))
        sync.push(2)
        problems = [(i, p.prompt, p.reference) for i, p in enumerate(prepare_data(cfg)[0].problems[:2])]
        results = ray.get([rollout.submit(w, problems[w:w + 1], sampling_params(cfg, 2, seed=w), [w], 2)
                           for w in range(2)])
        assert [g.policy_version for r in results for g in r.groups] == [2, 2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_after_a_push_every_rollout_worker_serves_the_trainers_weights(ray_local, tiny_model, cache_dir, tmp_path,
                                                                      dtype):
    """Compared with the trainer's own export (save_pretrained of its weights in the serving dtype), bit for bit."""
    from safetensors.torch import load_file

    cfg = compose(_overrides(cache_dir, tmp_path / "push", 1, f"model.dtype={dtype}", "trainer.lr=1e-2",
                             "reward.terms=[{name: 'tests.test_async:length_reward', weight: 1.0}]"))
    with pools(cfg, tiny_model) as (train, rollout, sync):
        problems = [(i, p.prompt, p.reference) for i, p in enumerate(prepare_data(cfg)[0].problems[:P])]
        groups = [g for w in range(2) for g in ray.get(rollout.submit(
            w, problems[w * 2:w * 2 + 2], sampling_params(cfg, 0, seed=w), [w * 2, w * 2 + 1], 0)).groups]
        batch = build_batch(cfg, groups, TokenRules.load(tiny_model).pad_id, train)
        train_on(cfg, batch, train, make_loss(cfg, 8), step=0)
        sync.push(1)
        train.save(str(tmp_path / "export"), False)
        exported = load_file(str(tmp_path / "export" / "policy" / "model.safetensors"))
        initial = load_file(str(Path(tiny_model) / "model.safetensors"))
        moved = (exported["model.norm.weight"].float() - initial["model.norm.weight"]).abs().max()
        assert moved > 1e-3, "the update did not move the weights: nothing to check the push against"
        for actor in rollout.actors:
            served = dict(ray.get(actor.loaded_weights.remote()))
            assert served.keys() == exported.keys()
            for name, tensor in exported.items():
                assert served[name].dtype == getattr(torch, dtype) and torch.equal(served[name], tensor), name
