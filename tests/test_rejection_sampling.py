"""Rejection sampling: each filter against crafted good and bad samples, deduplication, the shard store's plan and
merge, and a real run killed mid-way and started again (every sample written once, finished shards untouched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from r1.data.filters import rejection_reason, repetition
from r1.data.prompts import Problem
from r1.rejection_sampling import ShardStore, select
from r1.types import Group, Sample
from tests.conftest import REPO, TINY, compose, kill_when

RULES = compose([*TINY, "run_dir=x", "+experiment=r1_rejection_sampling", "rejection.max_response_tokens=40",
                 "rejection.keep_per_prompt=2"]).rejection
GOOD = "<think> 3 + 4 = 7 , 7 + 2 = 9 , so 9 , check 9 - 2 = 7 , 7 - 4 = 3 , ok </think> <answer> 9 </answer>"


def sample(text: str = GOOD, correct: bool = True, finish: str = "stop", tokens: int = 30) -> Sample:
    return Sample([1], list(range(tokens)), [0.0] * tokens, text, float(correct),
                  {"accuracy": float(correct), "format": 1.0}, "9", finish, 0)


@pytest.mark.parametrize("s, reason", [
    (sample(), None),
    (sample(correct=False), "incorrect"),
    (sample(finish="length"), "truncated"),  # cut off by the sampling budget
    (sample(tokens=41), "truncated"),  # longer than rejection.max_response_tokens
    (sample("9 <think> 3 + 4 = 7 </think>"), "bad_format"),
    (sample("<think> 3 + 4 = 7 , 然后 加上 二 得到 九 so 9 </think> <answer> 9 </answer>"), "language_mixing"),
    (sample("<think> " + "7 + 2 = 9 , " * 12 + "</think> <answer> 9 </answer>"), "repetitive"),
], ids=["good", "incorrect", "length", "overlong", "format", "mixing", "repetitive"])
def test_each_filter_rejects_its_samples_and_keeps_the_good_one(s, reason):
    assert rejection_reason(s, RULES, "en") == reason


def test_repetition_is_the_share_of_repeated_ngrams():
    assert repetition("a b c d e f g h", 2) == 0.0
    assert repetition("a b a b a b", 2) == pytest.approx(1 - 2 / 5)  # ab, ba, ab, ba, ab: 2 distinct of 5
    assert repetition("a b", 6) == 0.0  # too short to repeat


def test_duplicates_and_samples_beyond_keep_per_prompt_are_dropped_and_counted():
    group = Group(0, None, [sample(), sample(GOOD.replace(" , ", "  ,  ")), sample(correct=False),
                            sample(GOOD.replace("ok", "fine")), sample(GOOD.replace("ok", "good"))])
    rows, counts = select([group], [Problem("Compute 3 + 4 + 2", "9")], RULES, "en", {"model": "m"}, shard=3)
    assert [r["response"] for r in rows] == [GOOD, GOOD.replace("ok", "fine")]  # whitespace-only duplicate dropped
    assert counts == Counter({"samples": 5, "kept": 2, "rejected/duplicate": 1, "rejected/incorrect": 1,
                              "rejected/over_keep_per_prompt": 1})
    assert rows[1]["provenance"] == {"model": "m", "shard": 3, "prompt_index": 0, "sample": 3}


def test_the_store_refuses_another_plan_and_merges_without_duplicates(tmp_path):
    store = ShardStore(tmp_path, {"model": "a", "seed": 0})
    row = {"prompt": "p", "response": "r", "provenance": {"shard": 0}}
    store.write(0, [row, row | {"response": "s"}], Counter(kept=2))
    store.write(1, [row | {"response": " r "}], Counter(kept=1))  # the same as shard 0's first, whitespace aside
    assert store.done(0) and store.done(1) and not store.done(2)
    assert store.merge(2, tmp_path / "out.parquet") == (2, 1)
    import pyarrow.parquet as pq

    assert [r["response"] for r in pq.read_table(tmp_path / "out.parquet").to_pylist()] == ["r", "s"]
    with pytest.raises(ValueError, match="sampled with another plan"):
        ShardStore(tmp_path, {"model": "b", "seed": 0})


@pytest.mark.slow
def test_a_killed_run_resumes_and_writes_every_sample_once(tiny_model, cache_dir, tmp_path):
    run_dir = tmp_path / "rs"
    args = [*TINY, "+experiment=r1_rejection_sampling", f"cache_dir={cache_dir}", f"run_dir={run_dir}",
            "rejection.num_prompts=24", "rejection.prompts_per_shard=2", "rejection.samples_per_prompt=2",
            "rejection.max_new_tokens=16", "rollout.num_workers=1",
            # a 3-step model is never right: a user verifier that accepts everything, and no readability filters,
            # so that rows get written
            "reward.terms=[{name: 'tests.test_rejection_sampling:always', weight: 1.0}]",
            "rejection.correct_term='tests.test_rejection_sampling:always'", "rejection.require_format=false",
            "rejection.min_language_consistency=0", "rejection.max_repetition=1"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "launcher.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = run_dir / "rejection"
    kill_when(proc, lambda: len(list(shards.glob("shard_*.jsonl"))) >= 3)
    before = {p.name: p.read_bytes() for p in shards.glob("shard_*.jsonl")}
    assert 3 <= len(before) < 12 and not (run_dir / "sft_data.jsonl").exists(), "killed too late"

    done = subprocess.run([sys.executable, "-m", "launcher.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, content in before.items():  # shards written before the kill were not sampled again
        assert (shards / name).read_bytes() == content, name
    rows = [json.loads(x) for x in (run_dir / "sft_data.jsonl").read_text().splitlines()]
    written = [(r["provenance"]["prompt_index"], r["provenance"]["sample"]) for r in rows]
    summary = json.loads((shards / "summary.json").read_text())
    assert len(written) == len(set(written)) == summary["rows"] > 0  # no sample twice
    assert {i for i, _ in written} <= set(range(24)) and summary["samples"] == 24 * 2
    assert all(r["provenance"]["shard"] == r["provenance"]["prompt_index"] // 2 for r in rows)
    assert summary["kept"] + sum(v for k, v in summary.items() if k.startswith("rejected/")) == 48


def test_two_shards_in_flight_on_a_worker_that_dies_are_both_redone_and_it_is_replaced_once(
        ray_local, tiny_model, cache_dir, tmp_path, monkeypatch):
    """One worker, two shards in flight on it (rejection sampling keeps two per worker), SIGKILLed once both are
    sent: both requests fail; the first failure replaces the worker, the second finds the replacement already there
    (replacing again would kill it with the redone shard on it). Every shard is written, each equal to the same
    shard of a run without the fault."""
    import signal

    import ray

    from r1 import rejection_sampling
    from r1.workers.pools import RolloutPool

    real_submit, sent = RolloutPool.submit, []

    def submit_then_kill(pool, worker, *args):
        ref = real_submit(pool, worker, *args)
        sent.append(worker)
        if len(sent) == 2:  # both first shards are queued on worker 0
            os.kill(ray.get(pool.actors[worker].pid.remote()), signal.SIGKILL)
        return ref

    def args(run_dir, prompts):
        return [*TINY, "+experiment=r1_rejection_sampling", f"cache_dir={cache_dir}", f"run_dir={run_dir}",
                f"rejection.num_prompts={prompts}", "rejection.prompts_per_shard=2", "rejection.samples_per_prompt=2",
                "rejection.max_new_tokens=16", "rollout.num_workers=1",
                "reward.terms=[{name: 'tests.test_rejection_sampling:always', weight: 1.0}]",
                "rejection.correct_term='tests.test_rejection_sampling:always'", "rejection.require_format=false",
                "rejection.min_language_consistency=0", "rejection.max_repetition=1"]

    with monkeypatch.context() as patch:
        patch.setattr(RolloutPool, "submit", submit_then_kill)
        faulty = rejection_sampling.run(compose(args(tmp_path / "faulty", 8)))["summary"]
    # the reference: shards 0 and 1 (the redone ones) sampled without a fault (a shard's seed is its index)
    clean = rejection_sampling.run(compose(args(tmp_path / "clean", 4)))["summary"]
    assert sent[:2] == [0, 0] and len(sent) == 4 + 2  # 4 shards, the 2 lost ones sent again
    assert faulty["workers_replaced"] == 1 and faulty["shards_redone"] == 2 and faulty["unwritten_shards"] == []
    assert all((tmp_path / "faulty" / f"rejection/shard_{shard:06d}.jsonl").is_file() for shard in range(4))
    for shard in range(2):
        name = f"rejection/shard_{shard:06d}.jsonl"
        assert (tmp_path / "faulty" / name).read_text() == (tmp_path / "clean" / name).read_text()
    assert faulty["rows"] > 0 and "shards_redone" not in clean


def always(response: str, reference: str) -> float:
    return 1.0


def test_a_correct_term_that_is_no_reward_term_is_an_error():
    from r1.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match=r"rejection.correct_term='acc' is not one of reward.terms"):
        validate(compose([*TINY, "run_dir=x", "+experiment=r1_rejection_sampling", "rejection.correct_term=acc"]))


def test_truncated_samples_are_kept_only_when_asked():
    from omegaconf import OmegaConf

    rules = OmegaConf.merge(RULES, {"keep_truncated": True})
    assert rejection_reason(sample(finish="length"), rules, "en") is None
    assert rejection_reason(sample(tokens=41), rules, "en") == "truncated"  # max_response_tokens still holds
