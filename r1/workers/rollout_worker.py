"""One rollout worker: a rollout engine, the tokenizer and template, and the reward (with its verifier pool).

Generation and weight reception run on separate threads (Ray concurrency groups ``generate`` and ``sync``), so a
weight update never waits for a request in flight: the new weights are *staged* when they arrive and loaded at the
next safe point. A request carries the policy version it was made at, and is generated with exactly that version:
staged versions up to it are loaded before it starts, newer ones stay staged for the requests that ask for them.
With ``rollout.partial_rollouts`` the newest staged version is also loaded between two decode steps of a request.
"""

from __future__ import annotations

import os
import threading
import time

import ray
import torch

from r1.data.template import apply_template
from r1.data.tokens import TokenRules
from r1.distributed.bucketed_broadcast import GroupMembership
from r1.engines.registry import build_rollout_engine
from r1.eval.metrics import summarize_problem
from r1.rewards import build_reward, format_reward
from r1.types import Group, Sample, SamplingParams


class RolloutWorker:
    def __init__(self, cfg, model_path: str, index: int):
        torch.set_num_threads(max(1, cfg.rollout.torch_threads))
        self.cfg, self.index = cfg, index
        self.tokens = TokenRules.load(model_path)
        self.engine = build_rollout_engine(cfg, model_path)
        self.reward = build_reward(
            [(t.name, t.weight) for t in cfg.reward.terms],
            verify_workers=cfg.reward.verify_workers,
            verify_timeout_s=cfg.reward.verify_timeout_s,
        )
        self.reward.verifier.warm_up()  # not mid-run, on the first step whose responses contain an answer
        self.version = 0
        self.sync = GroupMembership()  # re-formed when a rollout worker is replaced
        self._staged: dict[int, list[tuple[str, torch.Tensor]]] = {}  # received, not yet loaded, by version
        self._lock = threading.Lock()
        self._busy_s, self._busy_since = 0.0, None

    def _encode(self, prompt: str) -> list[int]:
        return self.tokens.encode(apply_template(prompt, self.cfg.data.template))

    @ray.method(concurrency_group="generate")
    def generate_groups(
        self, problems: list[tuple[int, str, str]], params: SamplingParams, uids: list[int], version: int,
        allow_partial: bool = True,
    ) -> list[Group]:
        """G completions per (index, prompt, reference) with policy ``version``, scored; groups tagged with uid and
        the versions that produced them."""
        start = time.time()
        self._busy_since = start
        try:
            return self._generate_groups(problems, params, uids, version, allow_partial)
        finally:
            self._busy_s += time.time() - start
            self._busy_since = None

    def _generate_groups(self, problems, params, uids, version, allow_partial) -> list[Group]:
        prompt_ids = [self._encode(p) for _, p, _ in problems]
        self.apply_staged(up_to=version)  # the request boundary: the version this request was made at
        partial = allow_partial and self.cfg.rollout.partial_rollouts
        step_s = self.cfg.rollout.simulated_decode_step_s
        hook = None
        if partial or step_s > 0:
            last_step_end = time.time()

            def hook() -> int:
                nonlocal last_step_end
                if step_s > 0:  # emulated decode latency: this step ends no earlier than step_s after the last
                    time.sleep(max(0.0, last_step_end + step_s - time.time()))
                    last_step_end = time.time()
                return self.apply_staged() if partial else self.version

        t0 = time.time()
        completions = self.engine.generate(prompt_ids, params, between_steps=hook)
        if step_s > 0:  # a request lasts as long as a full-length one would, so benchmark timings are known
            time.sleep(max(0.0, t0 + step_s * params.max_new_tokens - time.time()))
        texts = self.tokens.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        refs = [ref for _, _, ref in problems for _ in range(params.n)]
        scored = self.reward.score(texts, refs)
        groups = []
        for g, (index, _, ref) in enumerate(problems):
            samples = []
            for j in range(g * params.n, (g + 1) * params.n):
                c = completions[j]
                versions = c.token_versions if c.token_versions else [self.version]
                samples.append(
                    Sample(
                        prompt_ids=prompt_ids[g], response_ids=c.token_ids, rollout_logprobs=c.rollout_logprobs,
                        response_text=texts[j], reward=scored.total[j],
                        reward_components={k: v[j] for k, v in scored.components.items()},
                        answer=scored.answers[j], finish_reason=c.finish_reason, policy_version=min(versions),
                        token_versions=c.token_versions,
                    )
                )
            groups.append(Group(index, ref, samples, uid=uids[g]))
        return groups

    @ray.method(concurrency_group="generate")
    def evaluate(self, problems: list[tuple[int, str, str]], params: SamplingParams, version: int) -> list[dict]:
        """Per problem: pass@1 over k samples, cons@k correctness, format rate, mean response length."""
        # not through generate_groups: evaluation is not rollout work, busy_seconds() leaves it out
        groups = self._generate_groups(problems, params, [-1] * len(problems), version, allow_partial=False)
        verifier = self.reward.verifier
        out = []
        for group in groups:
            answers = [s.answer for s in group.samples]
            correct = verifier.equivalent_many([(group.reference, a) for a in answers])
            summary = summarize_problem(
                correct, [format_reward(s.response_text) for s in group.samples], answers, group.reference,
                verifier.equivalent,
            )
            out.append(
                {
                    "pass1": summary.pass1, "cons": float(summary.cons_correct), "format": summary.format_rate,
                    "length": sum(len(s.response_ids) for s in group.samples) / len(group.samples),
                }
            )
        return out

    def verifier_stats(self) -> dict[str, int]:
        s = self.reward.verifier.stats
        return {"checked": s.checked, "timeouts": s.timeouts, "errors": s.errors}

    def busy_seconds(self) -> float:
        """Cumulative time spent generating rollouts (not evaluations), including the request in progress (for
        generation-time and pool idle-time metrics)."""
        since = self._busy_since
        return self._busy_s + (time.time() - since if since is not None else 0.0)

    def pid(self) -> int:
        return os.getpid()

    # --- weight sync (runs on the `sync` thread, concurrently with generation) ---------------------------------
    @ray.method(concurrency_group="sync")
    def init_sync(self, host: str, port: int, rank: int, world_size: int) -> None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.sync.join(host, port, rank, world_size, backend=backend, timeout_s=self.cfg.sync.timeout_s)

    @ray.method(concurrency_group="sync")
    def receive_weights(self, manifest, version: int) -> None:
        """Receive ``version`` into a staging copy; it is loaded at the next safe point (see module docstring)."""
        arriving = self.sync.group.receive(manifest, int(self.cfg.sync.bucket_mb * 2**20), version)
        staged = [(n, t.clone()) for n, t in arriving]
        with self._lock:
            self._staged[version] = staged

    def apply_staged(self, up_to: int | None = None) -> int:
        """Load the newest staged version that is at most ``up_to`` (None: the newest), forget older staged ones;
        returns the policy version now in force."""
        with self._lock:
            usable = [v for v in self._staged if up_to is None or v <= up_to]
            newest = max(usable, default=None)
            weights = self._staged.pop(newest) if newest is not None else None
            for v in usable:
                self._staged.pop(v, None)
        if weights is not None:
            self.engine.load_weights(weights)
            self.version = newest
        return self.version

    def loaded_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The serving model's weights after loading anything staged (for bit-exactness checks)."""
        self.apply_staged()
        return [(n, t.clone()) for n, t in self.engine.named_weights()]

    def shutdown(self) -> None:
        self.reward.verifier.close()
