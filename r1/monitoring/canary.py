"""The mismatch canary: do the rollout engines and the trainer still compute the same policy?

Every peer logs the gap between the rollout engine's log-probs ``mu`` and the trainer's; when it grows (a kernel
change, a precision bug, a weight push that loaded the wrong tensors) runs drift and collapse hours later. r1 acts:

* **Probe.** At the start a rollout engine answers the first ``canary.probe_prompts`` held-out prompts greedily
  (``canary.probe_tokens`` tokens each): prompts and answers are the probe, fixed for the run (kept in checkpoints).
  After every ``canary.every_pushes``-th weight push the trainer, holding the version it just pushed, scores them
  (log-probs at temperature 1 of every token after the first: the prompt's too, where the model is unsure - its
  greedy answer's tokens are the ones it is surest of, log-probs near 0 whatever the weights), and every live rollout
  engine scores the same tokens teacher-forced under that version (``RolloutEngine.score``). The mean
  ``|log pi_trainer - log mu|`` over the probe's tokens, per engine
  (the worst is the run's), against ``canary.probe_threshold``. Fixed tokens, no sampling: the number moves only
  when the computation does, and a push that skipped or garbled a tensor shows at that push - as far as that
  tensor's staleness moves the log-probs beyond the engines' float noise (docs/algorithms.md).
* **Batch.** Every training batch's ``is_log_ratio_abs_mean`` (mean ``|log pi_old - log mu|`` over its tokens,
  ``r1.algo.offpolicy``) against ``canary.batch_threshold``. On-policy it is the engines' disagreement on sampled
  tokens; with ``max_staleness`` >= 1 it also holds the policy's lag.

Past a threshold the run does what ``canary.action`` says - ``log``, ``alert`` (W&B), ``mask`` (alert, and from the
next step on the loss drops tokens whose ratio leaves ``[algo.mask_low, algo.mask_high]``: masked IS on top of the
configured correction), ``stop`` (alert, checkpoint, exit 70, not requeued) - as an incident in the health table
(``<run_dir>/health/incidents.jsonl``) that says which signal, engine and version, the value and the threshold. The
escalation to masking is kept in checkpoints: a resumed run stays masked.

Cost per probe: one trainer forward over a few short sequences and one prefill of them per engine. The engine
scores as a request made at the pushed version, so with ``max_staleness`` >= 1 (no partial rollouts) its answer
waits for the engine's requests of older versions: the driver does not wait for it then, and collects it at a later
step (the trainer's half was computed at the push). On-policy the engines are idle after a push: it is collected at
once, and a bad push is acted on before the next batch is generated.
"""

from __future__ import annotations

import logging
import time

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from r1.health.policy import Incident
from r1.types import Group, Reference, Sample, collate

log = logging.getLogger(__name__)


class MismatchCanary:
    def __init__(self, cfg, train, workers, prompts: list[str], pad_id: int, record, stop):
        """``record``: where incidents go (``HealthSupervisor.record``); ``stop``: the run's ``GracefulStop``."""
        self.cfg, self.train, self.workers, self.pad_id = cfg.canary, train, workers, pad_id
        self.prompts = prompts[: self.cfg.probe_prompts]
        self.wait = cfg.algo.max_staleness == 0  # on-policy: the engines are idle after a push, collect at once
        self.record, self.stop = record, stop
        self.action = str(getattr(self.cfg.action, "value", self.cfg.action))
        self.escalated = False  # the loss masks (canary.action=mask fired)
        self.sequences: list[tuple[list[int], list[int]]] = []  # the probe: (prompt, greedy response) token ids
        self.pending: list[tuple[int, torch.Tensor, dict]] = []  # (version, trainer log-probs, worker -> ObjectRef)

    @property
    def active(self) -> bool:
        return bool(self.cfg.enabled and self.prompts)

    # --- probe ----------------------------------------------------------------------------------------------------
    def start(self, version: int) -> dict[str, float]:
        """Make the probe (a resumed run has it from its checkpoint) and check the weights in force."""
        if not self.active:
            return {}
        if not self.sequences:
            worker = self.workers.live[0]
            answered = ray.get(self.workers.pool.actors[worker].answer_greedily.remote(
                self.prompts, self.cfg.probe_tokens, version))
            # scored over every token after the first, the prompt's included: a greedy answer's own tokens are the
            # model's surest (log-probs near 0 whatever the weights - seen: a tiny model's 32 repeats of one token)
            self.sequences = [(prompt[:1], prompt[1:] + answer) for prompt, answer in answered]
        return self.after_push(version, force=True)

    def after_push(self, version: int, force: bool = False) -> dict[str, float]:
        """The push of ``version`` is done: the trainer scores the probe now, every live engine is asked to; their
        answers are compared now (on-policy) or when they come (``collect``)."""
        if not (self.active and self.sequences) or (not force and version % self.cfg.every_pushes):
            return {}
        samples = [Sample(p, r, [0.0] * len(r), "", 0.0, {}, None, "stop", version) for p, r in self.sequences]
        batch = collate([Group(0, Reference(), samples)], torch.zeros(len(samples)), self.pad_id)
        trainer = self.train.compute_logprobs(batch, temperature=1.0, reference=False)
        asked = {i: self.workers.pool.actors[i].score.remote(self.sequences, version) for i in self.workers.live}
        self.pending.append((version, trainer, asked))
        return self.collect(block=self.wait)

    def collect(self, block: bool) -> dict[str, float]:
        """Compare the probes whose answers are in (``block``: wait for all); metrics of the newest compared."""
        metrics: dict[str, float] = {}
        still = []
        for version, trainer, asked in self.pending:
            if not block and ray.wait(list(asked.values()), num_returns=len(asked), timeout=0)[1]:
                still.append((version, trainer, asked))
                continue
            metrics = self._compare(version, trainer, asked)
        self.pending = still
        return metrics

    def _compare(self, version: int, trainer: torch.Tensor, asked: dict) -> dict[str, float]:
        gaps: dict[int, float] = {}
        worst_token = 0.0
        for i, ref in asked.items():
            try:
                served, scored = ray.get(ref)
            except (RayActorError, RayTaskError) as err:  # (a dead worker is the lifecycle's to replace)
                log.warning("canary: rollout worker %d did not score the probe (%s)", i, type(err).__name__)
                continue
            if served != version:
                log.warning("canary: rollout worker %d scored the probe of version %d with version %d", i, version,
                            served)
            diffs = torch.cat([(trainer[row, len(p): len(p) + len(r)] - torch.tensor(scored[row])).abs()
                               for row, (p, r) in enumerate(self.sequences)])
            gaps[i] = float(diffs.mean())
            worst_token = max(worst_token, float(diffs.max()))
        if not gaps:
            return {}
        worst = max(gaps, key=gaps.get)
        tokens = sum(len(r) for _, r in self.sequences)
        if gaps[worst] > self.cfg.probe_threshold:
            self._fire("mismatch_probe", version, gaps[worst], self.cfg.probe_threshold,
                       f"rollout worker {worst} at policy version {version}: mean |log pi_trainer - log mu| "
                       f"{gaps[worst]:.4g} over the {tokens} probe tokens > canary.probe_threshold="
                       f"{self.cfg.probe_threshold:g}; per worker: " + ", ".join(f"{i}: {v:.3g}" for i, v in gaps.items()))
        return {"canary/probe_logp_diff_mean": gaps[worst], "canary/probe_logp_diff_max": worst_token,
                "canary/probe_version": float(version), "canary/escalated": float(self.escalated)}

    # --- training batches -----------------------------------------------------------------------------------------
    def watch_batch(self, train_stats: dict, version: int) -> dict[str, float]:
        """A training batch's mean |log pi_old - log mu| (``train_stats["is_log_ratio_abs_mean"]``), after the update
        that made ``version``."""
        value = train_stats.get("is_log_ratio_abs_mean")
        if not self.cfg.enabled or value is None:
            return {}
        if value > self.cfg.batch_threshold:
            self._fire("mismatch_batch", version, value, self.cfg.batch_threshold,
                       f"the batch trained into policy version {version}: mean |log pi_old - log mu| {value:.4g} over "
                       f"its tokens > canary.batch_threshold={self.cfg.batch_threshold:g}")
        return {"canary/escalated": float(self.escalated)}

    # --- acting -----------------------------------------------------------------------------------------------------
    def _fire(self, signal: str, version: int, value: float, threshold: float, detail: str) -> None:
        action = self.action
        if action == "mask":
            if self.escalated:
                action = "alert"  # (already masking: said again, nothing more to do)
            else:
                self.escalated = True
                detail += ("; from the next step the loss drops tokens whose pi_old / mu leaves [algo.mask_low, "
                           "algo.mask_high] (masked IS)")
        elif action == "stop":
            detail += "; stopping after this step with a checkpoint (exit 70, not requeued): find the cause first"
        incident = Incident(signal, action, "driver", detail=detail, time=time.time())
        self.record(incident)
        if action == "stop":
            self.stop.halt(f"canary: {signal} at policy version {version} ({value:.4g} > {threshold:g})",
                           incident.to_dict())

    def state_dict(self) -> dict:
        return {"escalated": self.escalated, "sequences": [[p, r] for p, r in self.sequences]}

    def load_state_dict(self, state: dict) -> None:
        self.escalated = bool(state.get("escalated", False))
        self.sequences = [(list(p), list(r)) for p, r in state.get("sequences", [])]
