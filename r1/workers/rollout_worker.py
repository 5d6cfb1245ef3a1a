"""One rollout worker: a Ray actor that hosts a rollout engine and serves generation requests on it.

An asyncio Ray actor: many generation requests are in flight at once on one engine (vLLM batches them
continuously), rewards are scored on a thread (math-verify's process pool) so decoding never waits for them, and
weights are received on a thread of their own (concurrency group ``sync``) so a weight update never waits for a
request in flight. Its parts, one job each: the text side - template, tokenizer, rewards, groups
(``r1.workers.rollout_scoring``); which policy version a request gets and when staged weights load
(``r1.workers.version_admission``); here, the engine's life.

An engine that dies, or has requests in flight and produces no token for ``rollout.stall_timeout_s`` (a weight load
in progress is not a stall), takes this actor down with it, so the pool's replacement path starts a fresh worker
and redoes the lost requests once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import torch

from r1.cluster import placement
from r1.distributed.staged_receiver import SyncSpec
from r1.engines.protocols import EngineDead
from r1.engines.registry import build_rollout_engine
from r1.types import Group, Reference, Rollouts, SamplingParams, WorkerTotals
from r1.workers.rollout_scoring import PROMPT_TOO_LONG, GroupScorer
from r1.workers.version_admission import VersionAdmission

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
        self.engine = build_rollout_engine(cfg, model_path, index)
        self.scorer = GroupScorer(cfg, model_path, index, reward_models)
        self.reward = self.scorer.reward
        self.admission = VersionAdmission(self.engine, cfg.rollout.partial_rollouts, self._engine_failed)
        self._watching = False
        self._accepted: int = 0  # requests taken and not yet generated (waiting for their turn, or generating)
        self._quiet_since = time.time()  # when the engine last had nothing to do, or finished loading weights
        self._rollouts_running, self._busy_s, self._busy_since, self._reward_s = 0, 0.0, None, 0.0

    async def _setup(self) -> None:
        if not self._watching:
            self._watching = True
            asyncio.get_running_loop().create_task(self._watchdog())

    # --- requests ------------------------------------------------------------------------------------------------
    async def generate_groups(
        self, problems: list[tuple[int, str, Reference]], params: SamplingParams, uids: list[int], version: int
    ) -> Rollouts:
        """G completions per (index, prompt, reference) with policy ``version``, scored; groups tagged with uid and
        the versions that produced them (or skipped, with the reason); with this worker's totals."""
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
        prompt_ids = self.scorer.encode([p for _, p, _ in problems])
        skipped = {g: PROMPT_TOO_LONG for g, ids in enumerate(prompt_ids) if not self.scorer.fits(ids)}
        made = [g for g in range(len(problems)) if g not in skipped]
        completions = await self._generate([prompt_ids[g] for g in made], params, version) if made else []
        texts = self.scorer.decode([c.token_ids for c in completions])
        refs = [problems[g][2] for g in made for _ in range(params.n)]
        prompts = [problems[g][1] for g in made for _ in range(params.n)]
        start = time.time()
        # off the event loop: decoding goes on meanwhile
        scored, failed = await asyncio.to_thread(self.scorer.score, texts, refs, prompts, params.n)
        scored = self.scorer.shape_length(scored, [len(c.token_ids) for c in completions], params.max_new_tokens)
        if rollout:
            self._reward_s += time.time() - start
        skipped |= {made[k]: reason for k, reason in failed.items()}
        return self.scorer.groups(problems, prompt_ids, made, completions, texts, scored, params.n, uids, skipped,
                                  self.engine.version)

    async def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, version: int):
        return await self._admitted(version, lambda: self.engine.generate(prompt_ids, params))

    async def _admitted(self, version: int, work):
        """``work()`` (an engine call) as a request made at ``version``: after the version rules let it start."""
        if not self._accepted:
            self._quiet_since = time.time()
        self._accepted += 1
        try:
            await self.admission.admit(version)
            try:
                return await work()
            except EngineDead as err:
                self._engine_failed(err)
            finally:
                await self.admission.finished()
        finally:
            self._accepted -= 1

    async def evaluate(self, problems: list[tuple[int, str, Reference]], params: SamplingParams,
                       version: int) -> list[dict]:
        """Per problem, its evaluation row (``GroupScorer.eval_row``), or ``{"skipped": reason}``."""
        await self._setup()
        # not through generate_groups: evaluation is not rollout work, the busy and reward totals leave it out
        groups = await self._generate_groups(problems, params, [-1] * len(problems), version, rollout=False)
        return [{"skipped": g.skipped} if g.skipped else self.scorer.eval_row(g) for g in groups]

    async def answer_greedily(self, prompts: list[str], max_new_tokens: int,
                              version: int) -> list[tuple[list[int], list[int]]]:
        """The mismatch canary's probe (``r1.monitoring.canary``): each prompt's token ids and its greedy answer's,
        by policy ``version``."""
        await self._setup()
        prompt_ids = self.scorer.encode(prompts)
        params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0)
        completions = await self._generate(prompt_ids, params, version)
        return [(ids, list(c.token_ids)) for ids, c in zip(prompt_ids, completions)]

    async def score(self, sequences: list[tuple[list[int], list[int]]], version: int) -> tuple[int, list[list[float]]]:
        """The mismatch canary's probe: the engine's log-probs (temperature 1) of fixed (prompt, response) token
        sequences under policy ``version`` (admitted like a request made at it). Returns the version in force and
        one list per sequence."""
        await self._setup()

        async def scored():
            return self.engine.version, await self.engine.score(sequences)  # (the version in force as it starts)

        return await self._admitted(version, scored)

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
        while True:
            timeout = self.cfg.rollout.stall_timeout_s
            await asyncio.sleep(min(1.0, timeout / 4))
            if self.admission.loading or not self._accepted:
                self._quiet_since = time.time()  # idle, or loading weights: no token is due
            elif time.time() - max(self.engine.last_token_time, self._quiet_since) > timeout:
                self._engine_failed(TimeoutError(
                    f"{self._accepted} request(s) waiting or in flight and no token for {timeout:.0f} s "
                    "(rollout.stall_timeout_s)"))

    def heartbeat(self) -> tuple[float, int]:
        """Signs that the engine is working, for the driver's progress watchdog: when it last produced a token, and
        how many weight versions it has loaded (an idle engine shows none)."""
        return self.engine.last_token_time, self.admission.loads

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
        admission rules (``r1.workers.version_admission``). ``SyncBroken``: the broadcast failed (a peer vanished), the group must be re-formed."""
        await self._setup()
        try:
            await self.engine.wait_staged(version)
        except EngineDead as err:
            self._engine_failed(err)
        await self.admission.staged_version(version)

    async def loaded_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The serving model's weights after loading anything staged (bit-exactness checks; HF engine only)."""
        await self._setup()
        await self.admission.load_newest()
        return [(n, t.clone()) for n, t in self.engine.named_weights()]

    def shutdown(self) -> None:
        self.scorer.close()
        self.engine.shutdown()
