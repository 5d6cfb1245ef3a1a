"""One rollout worker: a rollout engine, the tokenizer and template, and the reward (with its verifier pool)."""

from __future__ import annotations


import torch

from r1.data.template import apply_template
from r1.distributed.weight_sync import WeightSyncGroup
from r1.engines.registry import build_rollout_engine
from r1.eval.metrics import summarize_problem
from r1.rewards import build_reward, format_reward
from r1.types import Group, Sample, SamplingParams


class RolloutWorker:
    def __init__(self, cfg, model_path: str, index: int):
        from transformers import AutoTokenizer

        torch.set_num_threads(max(1, cfg.rollout.torch_threads))
        self.cfg, self.index = cfg, index
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.engine = build_rollout_engine(cfg, model_path)
        self.reward = build_reward(
            [(t.name, t.weight) for t in cfg.reward.terms],
            verify_workers=cfg.reward.verify_workers,
            verify_timeout_s=cfg.reward.verify_timeout_s,
        )
        self.version = 0
        self.sync: WeightSyncGroup | None = None

    def _encode(self, prompt: str) -> list[int]:
        text = apply_template(prompt, self.cfg.data.template)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_groups(self, problems: list[tuple[int, str, str]], params: SamplingParams) -> list[Group]:
        """G completions per (index, prompt, reference), scored; returned as groups tagged with the policy version."""
        prompt_ids = [self._encode(p) for _, p, _ in problems]
        completions = self.engine.generate(prompt_ids, params)
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        refs = [ref for _, _, ref in problems for _ in range(params.n)]
        scored = self.reward.score(texts, refs)
        groups = []
        for g, (index, _, ref) in enumerate(problems):
            samples = []
            for j in range(g * params.n, (g + 1) * params.n):
                c = completions[j]
                samples.append(
                    Sample(
                        prompt_ids=prompt_ids[g], response_ids=c.token_ids, rollout_logprobs=c.logprobs,
                        response_text=texts[j], reward=scored.total[j],
                        reward_components={k: v[j] for k, v in scored.components.items()},
                        answer=scored.answers[j], finish_reason=c.finish_reason, policy_version=self.version,
                    )
                )
            groups.append(Group(index, ref, samples))
        return groups

    def evaluate(self, problems: list[tuple[int, str, str]], params: SamplingParams) -> list[dict]:
        """Per problem: pass@1 over k samples, cons@k correctness, format rate, mean response length."""
        groups = self.generate_groups(problems, params)
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

    # --- weight sync ------------------------------------------------------------------------------------------
    def init_sync(self, host: str, port: int, rank: int, world_size: int) -> None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.sync = WeightSyncGroup(host, port, rank, world_size, backend=backend, timeout_s=self.cfg.sync.timeout_s)

    def receive_weights(self, manifest, version: int) -> None:
        self.engine.load_weights(self.sync.receive(manifest, int(self.cfg.sync.bucket_mb * 2**20), version))
        self.version = version

    def shutdown(self) -> None:
        self.reward.verifier.close()
