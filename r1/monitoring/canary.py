"""The mismatch canary: do the rollout engines and the trainer still compute the same policy?

Every peer logs the gap between the rollout engine's log-probs ``mu`` and the trainer's; when it grows (a kernel
change, a precision bug, a weight push that loaded the wrong tensors) runs drift and collapse hours later. r1 acts:

* **Probe**, after every ``canary.every_pushes``-th weight push (and once on the initial weights): each live rollout
  worker answers the first ``canary.probe_prompts`` held-out prompts greedily with the pushed version, with its
  log-probs of its tokens; the trainer, still holding that version, scores the same tokens. The mean
  ``|log pi_trainer - log mu|`` over the probe's tokens, per worker (the worst is the run's), against
  ``canary.probe_threshold``. Greedy and fixed prompts: the number moves only when the computation does, not with
  sampling, and a push that skipped or garbled a tensor is seen at that push.
* **Batch**: the training batch's ``is_log_ratio_abs_mean`` (mean ``|log pi_old - log mu|`` over its tokens, from
  ``r1.algo.offpolicy``), against ``canary.batch_threshold``. On-policy it is the engines' disagreement on sampled
  tokens; with ``max_staleness`` >= 1 it also holds the policy's lag.

Past a threshold the run does what ``canary.action`` says - ``log``, ``alert`` (W&B), ``mask`` (alert, and from the next
step on the loss drops tokens whose ratio leaves ``[algo.mask_low, algo.mask_high]``: masked IS instead of truncated
IS alone), ``stop`` (alert, checkpoint, exit 70, not requeued) - as an incident in the health table
(``<run_dir>/health/incidents.jsonl``) that says which signal, which worker and version, the value and the
threshold. The escalation to masking is kept in checkpoints: a resumed run stays masked.

Cost: one greedy generation of a few short prompts per engine and one trainer forward over them per probe. With
``max_staleness`` >= 1 and no partial rollouts, an engine takes the new version only after its requests of older
ones finish, so the probe (and the driver, which waits for it) waits that long: probe less often there
(``canary.every_pushes``) or use partial rollouts.
"""

from __future__ import annotations

import logging
import time

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from r1.health.policy import Incident
from r1.types import Group, Reference, collate

log = logging.getLogger(__name__)

ALERTING = ("alert", "mask", "stop")


class MismatchCanary:
    def __init__(self, cfg, train, workers, prompts: list[str], pad_id: int, record, stop):
        """``record``: where incidents go (``HealthSupervisor.record``); ``stop``: the run's ``GracefulStop``."""
        self.cfg, self.train, self.workers, self.pad_id = cfg.canary, train, workers, pad_id
        self.prompts = prompts[: self.cfg.probe_prompts]
        self.record, self.stop = record, stop
        self.action = str(getattr(self.cfg.action, "value", self.cfg.action))
        self.escalated = False  # the loss masks (canary.action=mask fired once)
        self.fired = 0

    @property
    def active(self) -> bool:
        return bool(self.cfg.enabled and self.prompts)

    # --- probe ----------------------------------------------------------------------------------------------------
    def probe(self, version: int) -> dict[str, float]:
        """After the push of ``version`` (0: the initial weights): probe every live rollout worker, compare with the
        trainer, act. Returns the metrics (``canary/probe_*``)."""
        if not self.active or (version and version % self.cfg.every_pushes):
            return {}
        start = time.time()
        asked = {i: self.workers.pool.actors[i].probe.remote(self.prompts, self.cfg.probe_tokens, version)
                 for i in self.workers.live}
        answers: dict[int, list] = {}
        for i, ref in asked.items():
            try:
                served, samples = ray.get(ref)
            except (RayActorError, RayTaskError) as err:  # (a dead worker is the lifecycle's to replace)
                log.warning("canary: rollout worker %d did not answer the probe (%s)", i, type(err).__name__)
                continue
            if served != version:
                log.warning("canary: rollout worker %d served version %d for a probe of %d", i, served, version)
            samples = [s for s in samples if s.response_ids]
            if samples:
                answers[i] = samples
        if not answers:
            return {}
        workers = list(answers)
        samples = [s for i in workers for s in answers[i]]
        batch = collate([Group(0, Reference(), samples)], torch.zeros(len(samples)), self.pad_id)
        trainer = self.train.compute_logprobs(batch, temperature=1.0, reference=False)
        gap = (trainer - batch.rollout_logprobs).abs() * batch.response_mask
        per_worker, tokens, row = {}, {}, 0
        for i in workers:
            rows = slice(row, row + len(answers[i]))
            tokens[i] = int(batch.response_mask[rows].sum())
            per_worker[i] = float(gap[rows].sum()) / tokens[i]
            row += len(answers[i])
        worst = max(per_worker, key=per_worker.get)
        metrics = {"canary/probe_logp_diff_mean": per_worker[worst],
                   "canary/probe_logp_diff_max": float(gap.max()),
                   "canary/probe_tokens": float(batch.response_mask.sum()),
                   "canary/probe_s": time.time() - start}
        if per_worker[worst] > self.cfg.probe_threshold:
            self._fire("mismatch_probe", version, per_worker[worst], self.cfg.probe_threshold,
                       f"rollout worker {worst} (policy version {version}): mean |log pi_trainer - log mu| "
                       f"{per_worker[worst]:.4g} over {tokens[worst]} greedy "
                       f"probe tokens > canary.probe_threshold={self.cfg.probe_threshold:g}; per worker: "
                       + ", ".join(f"{i}: {v:.3g}" for i, v in per_worker.items()))
        metrics["canary/escalated"] = float(self.escalated)
        return metrics

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
        self.fired += 1
        action = self.action
        if action == "mask":
            if self.escalated:
                action = "alert"  # (already masking: say it again, nothing more to do)
            else:
                self.escalated = True
                detail += "; from the next step the loss masks tokens whose pi_old / mu leaves [algo.mask_low, " \
                          "algo.mask_high] (masked IS)"
        elif action == "stop":
            detail += "; stopping after this step with a checkpoint (exit 70, not requeued): find the cause first"
        incident = Incident(signal, action, "driver", detail=detail, time=time.time())
        self.record(incident)
        if action == "stop":
            self.stop.halt(f"canary: {signal} at policy version {version} ({value:.4g} > {threshold:g})",
                           incident.to_dict())

    def state_dict(self) -> dict:
        return {"escalated": self.escalated}

    def load_state_dict(self, state: dict) -> None:
        self.escalated = bool(state.get("escalated", False))
