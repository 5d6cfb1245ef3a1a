"""A rollout worker's text side: prompts templated and tokenized, responses decoded and rewarded, groups made.

The reward is built per worker: its math-verify pool, its code sandbox (uids of its own: workers sharing a node
never share a sandbox uid) and its client of the reward-model replicas. A problem that cannot be made is not an
error of the whole request: a prompt that does not fit the engine's context, or whose responses make a reward term
raise, comes back as a skipped group with its reason (counted by the caller), and the request's other problems
are scored as usual.
"""

from __future__ import annotations

import logging

from r1.data.template import apply_template
from r1.data.tokens import TokenRules
from r1.eval.metrics import summarize_problem
from r1.inputs import context_length, prompt_fits
from r1.rewards import build_reward, format_reward
from r1.rewards.language import language_consistency
from r1.rewards.overlong import overlong_buffer_tokens, overlong_penalty
from r1.rewards.registry import RewardResult
from r1.rewards.reward_model import RewardModelClient
from r1.rewards.sandbox import NOBODY, SandboxLimits, SandboxUnavailable
from r1.types import Group, Reference, Sample

log = logging.getLogger(__name__)

PROMPT_TOO_LONG = "prompt_too_long"


class GroupScorer:
    def __init__(self, cfg, model_path: str, index: int, reward_models: list | None = None):
        self.cfg = cfg
        self.tokens = TokenRules.load(model_path)
        self.context = context_length(cfg, model_path)
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

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """The prompts, templated, as the model's token ids (one tokenizer call)."""
        return self.tokens.encode_batch([apply_template(p, self.cfg.data.template, self.tokens.tokenizer)
                                         for p in prompts])

    def fits(self, prompt_ids: list[int]) -> bool:
        return prompt_fits(prompt_ids, self.context)

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        return self.tokens.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def score(self, texts: list[str], refs: list[Reference], prompts: list[str], n: int
              ) -> tuple[RewardResult, dict[int, str]]:
        """Rewards of ``n`` responses per problem, and the problems (by position) whose scoring raised, with the
        reason. The whole batch at once (math-verify and the sandbox work in parallel); only if that raises, each
        problem alone, to find the ones at fault. A sandbox that cannot start is no problem's fault: it stops the
        run (``SandboxUnavailable`` passes)."""
        try:
            return self.reward.score(texts, refs, prompts), {}
        except SandboxUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 -- whatever a reward term raises is counted, never a crash
            log.warning("scoring a request raised %s: %s; scoring its problems one by one", type(err).__name__, err)
        total, answers, components, failed = [], [], {}, {}
        for g in range(len(texts) // n):
            part = slice(g * n, (g + 1) * n)
            try:
                one = self.reward.score(texts[part], refs[part], prompts[part])
            except SandboxUnavailable:
                raise
            except Exception as err:  # noqa: BLE001
                failed[g] = f"reward_error:{type(err).__name__}"
                log.warning("problem at position %d: a reward term raised %s: %s (skipped)", g, type(err).__name__,
                            err)
                one = RewardResult([0.0] * n, {name: [0.0] * n for name, _ in self.reward.terms}, [None] * n)
            total += one.total
            answers += one.answers
            for name, values in one.components.items():
                components.setdefault(name, []).extend(values)
        return RewardResult(total, components, answers), failed

    def shape_length(self, scored: RewardResult, lengths: list[int], max_tokens: int) -> RewardResult:
        """DAPO's overlong penalty (``algo.overlong_buffer_share`` > 0) added to each total, as the reward term
        ``overlong`` (``r1.rewards.overlong``); ``lengths``: response tokens, ``max_tokens``: this request's budget."""
        a = self.cfg.algo
        if a.overlong_buffer_share <= 0:
            return scored
        buffer = overlong_buffer_tokens(max_tokens, a.overlong_buffer_share)
        penalties = [overlong_penalty(n, max_tokens, buffer, a.overlong_penalty) for n in lengths]
        return RewardResult([t + p for t, p in zip(scored.total, penalties)],
                            scored.components | {"overlong": penalties}, scored.answers)

    @staticmethod
    def groups(problems, prompt_ids, made: list[int], completions, texts, scored: RewardResult, n: int,
               uids: list[int], skipped: dict[int, str], engine_version: int) -> list[Group]:
        """One group per problem, in order: its ``n`` samples (``made``: the positions generated, whose completions,
        texts and rewards follow in that order), or none and ``skipped`` with the reason."""
        groups, position = [], {g: k for k, g in enumerate(made)}
        for g, (index, _, ref) in enumerate(problems):
            if g in skipped:
                groups.append(Group(index, ref, [], uid=uids[g], skipped=skipped[g]))
                continue
            samples = []
            for j in range(position[g] * n, (position[g] + 1) * n):
                c = completions[j]
                versions = c.token_versions or [engine_version]
                samples.append(Sample(
                    prompt_ids=prompt_ids[g], response_ids=c.token_ids, rollout_logprobs=c.rollout_logprobs,
                    response_text=texts[j], reward=scored.total[j],
                    reward_components={k: v[j] for k, v in scored.components.items()},
                    answer=scored.answers[j], finish_reason=c.finish_reason, policy_version=min(versions),
                    token_versions=c.token_versions,
                ))
            groups.append(Group(index, ref, samples, uid=uids[g]))
        return groups

    def eval_row(self, group: Group) -> dict:
        """An evaluated problem: pass@1 over its k samples, cons@k correctness, format rate, language consistency,
        mean response length, and each sample's answer and correctness."""
        answers = [s.answer for s in group.samples]
        correct = ([s.reward_components["accuracy"] == 1.0 for s in group.samples]  # (scored already)
                   if "accuracy" in group.samples[0].reward_components
                   else self.reward.correct([group.reference] * len(answers), answers))
        summary = summarize_problem(  # programs vote by their text, math answers by math-verify
            correct, [format_reward(s.response_text) for s in group.samples], answers,
            (lambda a, b: False) if group.reference.is_code else self.reward.verifier.equivalent,
        )
        k = len(group.samples)
        return {
            "pass1": summary.pass1, "cons": float(summary.cons_correct), "format": summary.format_rate,
            "length": sum(len(s.response_ids) for s in group.samples) / k,
            "language": sum(language_consistency(s.response_text, self.cfg.reward.language)
                            for s in group.samples) / k,
            "answers": answers, "correct": [bool(c) for c in correct],
        }

    def close(self) -> None:
        self.reward.verifier.close()
