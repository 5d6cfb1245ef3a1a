"""One rollout worker: a rollout engine, the tokenizer and template, and the reward (with its verifier pool).

An asyncio Ray actor: many generation requests are in flight at once on one engine (vLLM batches them
continuously), rewards are scored on a thread (math-verify's process pool) so decoding never waits for them, and
weights are received on a thread of their own (concurrency group ``sync``) so a weight update never waits for a
request in flight. Received weights are *staged*; which requests see them is decided here:

- A request carries the policy version it was made at and starts with exactly that version: staged versions up to
  it are loaded once the requests still running an older version have finished (a request boundary).
- With ``rollout.partial_rollouts`` the newest staged version is loaded as soon as it arrives, into requests in
  flight (the engine keeps their KV cache; every token records the version that sampled it).

An engine that dies, or has requests in flight and produces no token for ``rollout.stall_timeout_s``, takes this
actor down with it, so the pool's replacement path starts a fresh worker and redoes the lost requests once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import torch

from r1.cluster import placement
from r1.data.template import apply_template
from r1.data.tokens import TokenRules
from r1.distributed.staged_receiver import SyncSpec
from r1.engines.protocols import EngineDead
from r1.engines.registry import build_rollout_engine
from r1.eval.metrics import summarize_problem
from r1.rewards import build_reward, format_reward
from r1.rewards.language import language_consistency
from r1.rewards.reward_model import RewardModelClient
from r1.rewards.sandbox import NOBODY, SandboxLimits
from r1.types import Group, Reference, Rollouts, Sample, SamplingParams, WorkerTotals

log = logging.getLogger(__name__)


def _adopt_orphans() -> None:
    """Make this worker the subreaper of every process it starts (Linux). vLLM's engine process starts processes of
    its own (one model runner per TP rank); if the engine process dies (a crash, the OOM killer) they would be
    re-parented to PID 1 and live on, holding their GPU memory, which the replacement worker then lacks. Adopted
    by this worker instead, they are among the children ``_engine_failed`` kills."""
    import sys

    from r1.rewards.sandbox_host import become_child_subreaper

    if sys.platform.startswith("linux") and (error := become_child_subreaper()) is not None:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER): %s; an engine's processes may outlive it", error)


class RolloutWorker:
    def __init__(self, cfg, model_path: str, index: int, reward_models: list | None = None):
        _adopt_orphans()
        torch.set_num_threads(max(1, cfg.rollout.torch_threads))
        self.cfg, self.index = cfg, index
        self.tokens = TokenRules.load(model_path)
        self.engine = build_rollout_engine(cfg, model_path, index)
        self.reward = build_reward(
            [(t.name, t.weight) for t in cfg.reward.terms],
            verify_workers=cfg.reward.verify_workers,
            verify_timeout_s=cfg.reward.verify_timeout_s,
            answer_extractor=cfg.reward.answer_extractor,
            final_line_pattern=cfg.reward.final_line_pattern,
            language=cfg.reward.language,
            sandbox=SandboxLimits(**{k: v for k, v in cfg.reward.sandbox.items() if k != "parallel"}),
            sandbox_parallel=cfg.reward.sandbox.parallel,
            sandbox_uid_base=NOBODY - index * cfg.reward.sandbox.parallel,  # (workers of a node: uids of their own)
            reward_model=RewardModelClient(reward_models, index) if reward_models else None,
        )
        self.reward.verifier.warm_up()  # not mid-run, on the first step whose responses contain an answer
        self._staged: set[int] = set()  # versions staged in every member of the engine, not yet loaded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn: asyncio.Condition | None = None  # request admission and weight loading, on the event loop
        self._running: int = 0  # requests generating now
        self._accepted: int = 0  # requests taken and not yet generated (waiting for their turn, or generating)
        self._rollouts_running, self._busy_s, self._busy_since, self._reward_s = 0, 0.0, None, 0.0

    async def _setup(self) -> None:
        if self._turn is None:
            self._loop, self._turn = asyncio.get_running_loop(), asyncio.Condition()
            self._loop.create_task(self._watchdog())

    def _encode(self, prompt: str) -> list[int]:
        return self.tokens.encode(apply_template(prompt, self.cfg.data.template, self.tokens.tokenizer))

    # --- requests ------------------------------------------------------------------------------------------------
    async def generate_groups(
        self, problems: list[tuple[int, str, Reference]], params: SamplingParams, uids: list[int], version: int
    ) -> Rollouts:
        """G completions per (index, prompt, reference) with policy ``version``, scored; groups tagged with uid and
        the versions that produced them; with this worker's totals."""
        await self._setup()
        self._rollouts_running += 1
        if self._rollouts_running == 1:
            self._busy_since = time.time()
        try:
            groups = await self._generate_groups(problems, params, uids, version, rollout=True)
        finally:
            self._rollouts_running -= 1
            if self._rollouts_running == 0:
                self._busy_s += time.time() - self._busy_since
                self._busy_since = None
        return Rollouts(groups, self.totals())

    async def _generate_groups(self, problems, params, uids, version, rollout: bool) -> list[Group]:
        prompt_ids = [self._encode(p) for _, p, _ in problems]
        self._accepted += 1
        try:
            await self._admit(version)
            try:
                completions = await self.engine.generate(prompt_ids, params)
            except EngineDead as err:
                self._engine_failed(err)
            finally:
                async with self._turn:
                    self._running -= 1
                    self._turn.notify_all()
        finally:
            self._accepted -= 1
        texts = self.tokens.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        refs = [ref for _, _, ref in problems for _ in range(params.n)]
        prompts = [prompt for _, prompt, _ in problems for _ in range(params.n)]
        start = time.time()
        scored = await asyncio.to_thread(self.reward.score, texts, refs, prompts)  # off the event loop: decoding goes on
        if rollout:
            self._reward_s += time.time() - start
        groups = []
        for g, (index, _, ref) in enumerate(problems):
            samples = []
            for j in range(g * params.n, (g + 1) * params.n):
                c = completions[j]
                versions = c.token_versions or [self.engine.version]
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

    async def _admit(self, version: int) -> None:
        """Start a request made at ``version``: load staged versions up to it first, once no request is still
        generating with an older one (with partial rollouts, at once: requests in flight take the update)."""
        partial = self.cfg.rollout.partial_rollouts
        async with self._turn:
            while self.engine.version < version and self._staged_up_to(version):
                if self._running and not partial:
                    await self._turn.wait()
                    continue
                await self._load_staged(up_to=version)
            self._running += 1

    async def evaluate(self, problems: list[tuple[int, str, Reference]], params: SamplingParams,
                       version: int) -> list[dict]:
        """Per problem: pass@1 over k samples, cons@k correctness, format rate, language consistency, mean response
        length, and each sample's answer and correctness."""
        await self._setup()
        # not through generate_groups: evaluation is not rollout work, the busy and reward totals leave it out
        groups = await self._generate_groups(problems, params, [-1] * len(problems), version, rollout=False)
        out = []
        for group in groups:
            answers = [s.answer for s in group.samples]
            correct = ([s.reward_components["accuracy"] == 1.0 for s in group.samples]  # (scored already)
                       if "accuracy" in group.samples[0].reward_components
                       else self.reward.correct([group.reference] * len(answers), answers))
            summary = summarize_problem(  # programs vote by their text, math answers by math-verify
                correct, [format_reward(s.response_text) for s in group.samples], answers,
                (lambda a, b: False) if group.reference.is_code else self.reward.verifier.equivalent,
            )
            k = len(group.samples)
            out.append(
                {
                    "pass1": summary.pass1, "cons": float(summary.cons_correct), "format": summary.format_rate,
                    "length": sum(len(s.response_ids) for s in group.samples) / k,
                    "language": sum(language_consistency(s.response_text, self.cfg.reward.language)
                                    for s in group.samples) / k,
                    "answers": answers, "correct": [bool(c) for c in correct],
                }
            )
        return out

    # --- engine health -------------------------------------------------------------------------------------------
    def _engine_failed(self, err: BaseException):
        import psutil

        log.error("rollout worker %d: engine failed (%s: %s); exiting so the pool replaces this worker",
                  self.index, type(err).__name__, err)
        for child in psutil.Process().children(recursive=True):  # a stalled engine would outlive us
            try:
                child.kill()
            except psutil.Error:
                pass
        os._exit(1)

    async def _watchdog(self) -> None:
        timeout = self.cfg.rollout.stall_timeout_s
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            if self._accepted and time.time() - self.engine.last_token_time > timeout:
                self._engine_failed(TimeoutError(
                    f"{self._accepted} request(s) waiting or in flight and no token for {timeout:.0f} s "
                    "(rollout.stall_timeout_s)"))
            if not self._accepted:
                self.engine.last_token_time = time.time()  # idle is not stalled

    # --- bookkeeping ---------------------------------------------------------------------------------------------
    def totals(self) -> WorkerTotals:
        """Running totals (busy time includes a request generating now: the generation-time and idle-time
        metrics)."""
        since = self._busy_since
        s = self.reward.verifier.stats
        return WorkerTotals(
            busy_s=self._busy_s + (time.time() - since if since is not None else 0.0), reward_s=self._reward_s,
            verifier={"checked": s.checked, "timeouts": s.timeouts, "errors": s.errors},
            sandbox=dict(self.reward.code.stats))

    def pid(self) -> int:
        return os.getpid()

    def placement(self) -> tuple[str, list[int]]:
        return placement()

    # --- weight sync (on the event loop; the waiting happens on threads) -----------------------------------------
    def sync_members(self) -> int:
        return self.engine.sync_members

    def members_alive(self) -> bool:
        """Whether the engine and each of its sync-group members is alive (asked after a failed broadcast)."""
        return self.engine.members_alive()

    async def init_sync(self, spec: SyncSpec) -> None:
        """Join a (re-formed) sync group: the engine's members are ranks ``spec.first_rank ..``."""
        await self._setup()
        try:
            await self.engine.join_sync(spec)
        except EngineDead as err:
            self._engine_failed(err)

    async def receive_weights(self, version: int) -> None:
        """Return once ``version`` is staged in every member of the engine; it is loaded per the rules in the module
        docstring. ``SyncBroken``: the broadcast failed (a peer vanished), the group must be re-formed."""
        await self._setup()
        try:
            await self.engine.wait_staged(version)
        except EngineDead as err:
            self._engine_failed(err)
        self._staged.add(version)
        if self.cfg.rollout.partial_rollouts:
            await self._load_newest()

    async def _load_newest(self) -> None:
        async with self._turn:
            await self._load_staged()

    def _staged_up_to(self, version: int) -> bool:
        return any(v <= version for v in self._staged)

    async def _load_staged(self, up_to: int | None = None) -> int:
        """Load the newest staged version that is at most ``up_to`` (None: the newest); the members free it and
        every older one. Returns the policy version now in force. Called with ``_turn`` held."""
        usable = [v for v in self._staged if up_to is None or v <= up_to]
        newest = max(usable, default=None)
        self._staged.difference_update(usable)
        if newest is not None and newest > self.engine.version:
            try:
                await self.engine.load(newest)
            except EngineDead as err:
                self._engine_failed(err)
        return self.engine.version

    async def loaded_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The serving model's weights after loading anything staged (bit-exactness checks; HF engine only)."""
        await self._setup()
        async with self._turn:
            await self._load_staged()
        return [(n, t.clone()) for n, t in self.engine.named_weights()]

    def shutdown(self) -> None:
        self.reward.verifier.close()
        self.engine.shutdown()
