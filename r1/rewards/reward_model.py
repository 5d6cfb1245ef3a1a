"""The ``reward_model`` reward term of R1's all-scenario RL: a ``transformers`` sequence-classification model scores
responses to general prompts (those without a reference answer or tests); reasoning prompts keep their rule rewards.

The model is served by its own Ray actors (``reward.model.num_workers`` replicas, each with its CPUs/GPUs), started
with the rollout pool and shared by its workers; each call scores a batch, ``reward.model.batch_size`` sequences per
forward pass. What the model reads: its tokenizer's chat template over the (user, assistant) turns where it has one,
else the run's prompt template applied to the prompt, then the response.
"""

from __future__ import annotations

import logging

import ray
import torch

log = logging.getLogger(__name__)


class RewardModelServer:
    """One replica (a Ray actor)."""

    def __init__(self, path: str, batch_size: int, template: str, torch_threads: int = 1):
        from transformers import AutoModelForSequenceClassification

        from r1.data.tokens import load_tokenizer

        torch.set_num_threads(max(1, torch_threads))
        self.tokenizer = load_tokenizer(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward.model.path={path}: a reward model has one output (num_labels=1), this one "
                             f"has {self.model.config.num_labels}")
        self.batch_size, self.template = batch_size, template

    def text(self, prompt: str, response: str) -> str:
        from r1.data.template import apply_template

        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
        return apply_template(prompt, "plain" if self.template == "chat" else self.template) + response

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [self.text(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True)
            out.extend(self.model(**enc.to(self.device)).logits[:, 0].float().tolist())
        return out


class RewardModelPool:
    """The reward model's replicas, started before the rollout workers that call them."""

    def __init__(self, cfg, path: str):
        m = cfg.reward.model
        server = ray.remote(RewardModelServer)
        self.actors = [server.options(num_cpus=m.cpus_per_worker, num_gpus=m.gpus_per_worker).remote(
            path, m.batch_size, cfg.data.template, int(max(1, m.cpus_per_worker))) for _ in range(m.num_workers)]
        ray.get([a.__ray_ready__.remote() for a in self.actors], timeout=600)
        log.info("reward model %s: %d replica(s)", path, len(self.actors))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class RewardModelClient:
    """A rollout worker's side: its replica (worker index round robin), called synchronously from the scoring
    thread."""

    def __init__(self, actors: list, index: int):
        self.actor = actors[index % len(actors)]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return ray.get(self.actor.score.remote(prompts, responses))
