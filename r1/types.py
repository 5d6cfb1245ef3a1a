"""The data that crosses process boundaries: sampling requests, completions, rollouts and training batches.

Plain dataclasses of Python lists and CPU tensors, so Ray can move them through its object store and every
engine (HF, vLLM, Megatron) speaks the same language.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt (the GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True)
class CodeTest:
    """One test case of a coding problem: the program gets ``stdin`` and must print ``stdout`` (compared line by
    line, trailing whitespace aside), or the Python ``assertion`` must hold after the program's own code ran."""

    stdin: str | None = None
    stdout: str | None = None
    assertion: str | None = None


@dataclass(frozen=True)
class Reference:
    """What a response is checked against: a final ``answer`` (math-verify), or ``tests`` the answer's program must
    all pass (run in the sandbox). A problem has one or the other, or neither (a general prompt)."""

    answer: str = ""
    tests: tuple[CodeTest, ...] = ()

    @property
    def is_code(self) -> bool:
        return bool(self.tests)

    @property
    def is_open(self) -> bool:
        """A general prompt: nothing to check against (all-scenario RL scores it with a reward model)."""
        return not self.answer and not self.tests


@dataclass
class Completion:
    """One sampled response. ``rollout_logprobs[i]`` is log p(token_ids[i]) under the sampling policy at
    temperature T, as the rollout engine computed it (the same name follows it into ``Sample`` and ``TrainBatch``)."""

    token_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str  # "stop" (EOS) or "length"
    # Policy version that produced each token, when weights may change mid-generation (partial rollouts).
    token_versions: list[int] | None = None


@dataclass
class Sample:
    """A scored completion of a prompt, as it travels from the rollout pool to the driver."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    response_text: str
    reward: float
    reward_components: dict[str, float]
    answer: str | None
    finish_reason: str
    policy_version: int  # the *oldest* version that produced any of its tokens (what staleness is measured on)
    token_versions: list[int] | None = None  # per response token; differs from policy_version only mid-update


@dataclass
class Group:
    """All G samples of one prompt: the unit of GRPO's advantage, of the rollout transport and of the buffer.

    ``uid`` numbers prompt draws in order: a group keeps its uid when regenerated (after a stale discard or a lost
    worker), so "every uid trained exactly once" is the no-loss, no-duplicate guarantee.
    """

    prompt_index: int
    reference: Reference
    samples: list[Sample]
    uid: int = -1
    skipped: str | None = None  # why its worker could not make it (no samples then): counted, never trained on

    @property
    def policy_version(self) -> int:
        return min(s.policy_version for s in self.samples)

    def to_json(self) -> dict:
        """Plain JSON (a checkpoint's buffer is read back without unpickling anything; floats round-trip exactly)."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Group:
        ref = d["reference"]
        return cls(prompt_index=d["prompt_index"], uid=d["uid"], skipped=d["skipped"],
                   reference=Reference(answer=ref["answer"], tests=tuple(CodeTest(**t) for t in ref["tests"])),
                   samples=[Sample(**s) for s in d["samples"]])


@dataclass
class WorkerTotals:
    """A rollout worker's running totals since it started. They travel with every result it returns, so the driver
    never makes a round trip to ask for them."""

    busy_s: float = 0.0  # time with at least one rollout request generating (evaluation not counted)
    reward_s: float = 0.0  # time scoring rollouts' rewards
    verifier: dict[str, int] = field(default_factory=dict)  # math-verify checks, timeouts, errors
    sandbox: dict[str, int] = field(default_factory=dict)  # code rewards: programs, passed, outcomes by kind


@dataclass
class Rollouts:
    """What one generation request returns: its scored groups, and the worker's totals as it finished."""

    groups: list[Group]
    totals: WorkerTotals


@dataclass
class TrainBatch:
    """Right-padded token sequences with per-token fields aligned to ``input_ids``.

    Position ``t`` of any per-token tensor refers to the token ``input_ids[:, t]`` (predicted from ``< t``);
    ``response_mask`` is 1 on response tokens only, so position 0 and prompt/padding positions never count.
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    response_mask: torch.Tensor  # [B, L] float
    advantages: torch.Tensor  # [B]
    rollout_logprobs: torch.Tensor | None = None  # [B, L] the rollout engine's log-probs of the sampled tokens
    old_logprobs: torch.Tensor | None = None  # [B, L] proximal policy pi_old (trainer recompute before the update)
    ref_logprobs: torch.Tensor | None = None  # [B, L] reference policy

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | slice | list[int]) -> TrainBatch:
        def pick(t):
            return None if t is None else t[index]

        return TrainBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            advantages=self.advantages[index],
            rollout_logprobs=pick(self.rollout_logprobs),
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
        )

    def to(self, device) -> TrainBatch:
        def move(t):
            return None if t is None else t.to(device)

        return TrainBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            response_mask=move(self.response_mask),
            advantages=move(self.advantages),
            rollout_logprobs=move(self.rollout_logprobs),
            old_logprobs=move(self.old_logprobs),
            ref_logprobs=move(self.ref_logprobs),
        )

    def trimmed(self) -> TrainBatch:
        """Drop trailing columns that are padding in every row (shards of a batch rarely need the full width)."""
        width = int(self.attention_mask.sum(dim=1).max()) if len(self) else 0
        if width >= self.input_ids.shape[1]:
            return self

        def cut(t):  # per-token tensors lose the padding columns; per-sequence ones (advantages) stay as they are
            return None if t is None else t[:, :width]

        return TrainBatch(
            input_ids=cut(self.input_ids), attention_mask=cut(self.attention_mask),
            response_mask=cut(self.response_mask), advantages=self.advantages,
            rollout_logprobs=cut(self.rollout_logprobs), old_logprobs=cut(self.old_logprobs),
            ref_logprobs=cut(self.ref_logprobs),
        )


def collate(groups: list[Group], advantages: torch.Tensor, pad_id: int) -> TrainBatch:
    """Flatten groups (in order) into a right-padded batch; ``advantages`` follows the same sample order."""
    samples = [s for g in groups for s in g.samples]
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    resp = torch.zeros((len(samples), width), dtype=torch.float32)
    rollout_logprobs = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[row, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attn[row, : p + r] = 1
        resp[row, p : p + r] = 1.0
        rollout_logprobs[row, p : p + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    return TrainBatch(ids, attn, resp, advantages.float(), rollout_logprobs=rollout_logprobs)
