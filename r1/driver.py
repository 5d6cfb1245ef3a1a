"""The R1-Zero GRPO loop, top to bottom.

    take a batch of rewarded groups from the rollout buffer (generated G per prompt by the rollout pool)
    -> reference/old log-probs -> group advantages -> update (training pool) -> sync weights -> refill the buffer
    -> health (every node's GPUs: alert, drain, abort) -> log -> checkpoint -> evaluate

With ``algo.max_staleness = 0`` this is the synchronous on-policy loop. With ``s >= 1`` the buffer keeps the rollout
pool generating the next batches (each with the policy version it was requested at) while the training pool updates
on this one, and the loss corrects for the lag with truncated importance weights. Everything engine-specific sits
behind the pools; everything algorithmic is a pure function from ``r1.algo``.

``step`` counts loop iterations (what ``trainer.total_steps``, logs, checkpoints and evaluation follow); ``version``
counts policy updates. They differ only after a step whose every group was dropped by dynamic sampling: such a step
makes no update, no new version and no weight push.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from r1.algo import (
    GRPOLoss,
    filter_uniform_groups,
    group_advantages,
    kl_shaped_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)
from r1.checkpoint import CheckpointManager
from r1.data.prompts import PromptSampler
from r1.data.tokens import TokenRules
from r1.eval.held_out import evaluate, print_comparison, provenance
from r1.health.supervisor import HealthSupervisor
from r1.inputs import prepare_model, prepare_prompts
from r1.monitoring.canary import MismatchCanary
from r1.monitoring.ledger import GroupLedger
from r1.monitoring.loggers import MetricsLogger
from r1.monitoring.progress import Progress
from r1.monitoring.stop import GracefulStop
from r1.rewards.sandbox import SandboxUnavailable
from r1.run_context import RunContext
from r1.types import SamplingParams, TrainBatch, WorkerTotals, collate
from r1.workers.lifecycle import WorkerLifecycle
from r1.workers.pools import RolloutPool, TrainPool, colocated, nodes_of
from r1.workers.rollout_buffer import RolloutBuffer
from r1.workers.weight_sync import WeightSync

log = logging.getLogger(__name__)


def max_tokens_at(cfg, version: int) -> int:
    """The response-length budget for policy ``version`` (the paper raises 32K -> 64K mid-training)."""
    stages = sorted(cfg.rollout.length_schedule, key=lambda s: s.from_step)
    return [s.max_tokens for s in stages if s.from_step <= version][-1]


def has_signal(group) -> bool:
    """DAPO's dynamic-sampling filter: a group whose rewards are all equal has zero advantage, hence no gradient."""
    rewards = torch.tensor([s.reward for s in group.samples])
    return bool(filter_uniform_groups(rewards, len(rewards))[0])


def build_batch(cfg, groups, pad_id: int, train: TrainPool) -> TrainBatch:
    """Groups -> padded batch with GRPO advantages. A KL penalty in the reward needs the reference log-probs here;
    one in the loss (the default) gets them from the trainer inside the update call."""
    rewards = torch.tensor([s.reward for grp in groups for s in grp.samples])
    batch = collate(groups, torch.zeros(len(rewards)), pad_id)
    if cfg.algo.kl_placement == "reward" and cfg.algo.kl_coef > 0:
        batch.ref_logprobs = train.compute_logprobs(batch, temperature=cfg.rollout.temperature, reference=True)
        rewards = kl_shaped_rewards(
            rewards, batch.rollout_logprobs, batch.ref_logprobs, batch.response_mask,
            coef=cfg.algo.kl_coef, kind=cfg.algo.kl_kind,
        )
    batch.advantages = advantages(cfg, rewards, batch.response_mask.sum(-1))
    return batch


def advantages(cfg, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One advantage per sample, by ``algo.advantage`` (``r1.algo.advantages``)."""
    a = cfg.algo
    if a.advantage == "rloo":
        return rloo_advantages(rewards, a.group_size)
    if a.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        return reinforce_pp_advantages(rewards, lengths, a.group_size,
                                       group_baseline=a.advantage == "reinforce_pp_baseline")
    return group_advantages(rewards, a.group_size, std_normalize=a.std_normalize)


def _name(value) -> str:
    return str(getattr(value, "value", value))  # (an enum of the structured config, or a plain string)


def make_loss(cfg, max_tokens: int, masked: bool = False) -> GRPOLoss:
    """The loss of a step; ``masked``: the mismatch canary escalated the run to masked IS (token level)."""
    a = cfg.algo
    mask_level = "token" if masked and _name(a.mask_level) == "none" else _name(a.mask_level)
    return GRPOLoss(
        clip_low=a.clip_low, clip_high=a.clip_high, agg=_name(a.loss_agg), kl_coef=a.kl_coef, kl_kind=_name(a.kl_kind),
        kl_in_loss=a.kl_placement == "loss", temperature=cfg.rollout.temperature, norm_constant=float(max_tokens),
        policy_loss=_name(a.policy_loss), is_level=_name(a.is_level), is_cap=a.is_cap, mask_level=mask_level,
        mask_low=a.mask_low, mask_high=a.mask_high,
    )


def train_on(cfg, batch: TrainBatch, train: TrainPool, loss: GRPOLoss, step: int) -> dict:
    """``minibatches_per_step`` optimizer steps over the batch (fewer only if it has fewer rows).

    With several minibatches, the proximal policy pi_old is fixed by one trainer pass before the first update. With
    one, pi_old *is* the policy being updated, so the loss takes it from the training forward itself (detached):
    same update, one forward pass less."""
    n_mb = min(cfg.algo.minibatches_per_step, len(batch))
    if n_mb > 1:
        batch.old_logprobs = train.compute_logprobs(batch, temperature=loss.temperature, reference=False)
    # Seeded by the step, not the global RNG, so a resumed run shuffles exactly as the uninterrupted one.
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(cfg.seed * 7_919 + step))
    stats: dict[str, float] = {}
    for chunk in torch.tensor_split(order, n_mb):  # exactly n_mb chunks whose sizes differ by at most one
        for k, v in train.train_step(batch.select(chunk), loss).items():
            stats[k] = stats.get(k, 0.0) + v / n_mb
    stats["optimizer_steps"] = n_mb
    return stats


def rollout_seconds(before: dict, now: dict, num_workers: int) -> tuple[float, float]:
    """Generation (busy) and reward seconds per rollout worker between two snapshots of the totals the workers sent
    with their results (a replaced worker starts again from 0)."""
    zero = WorkerTotals()
    gen = sum(max(0.0, t.busy_s - before.get(w, zero).busy_s) for w, t in now.items())
    reward = sum(max(0.0, t.reward_s - before.get(w, zero).reward_s) for w, t in now.items())
    return gen / num_workers, reward / num_workers


def rollout_metrics(groups) -> dict:
    samples = [s for g in groups for s in g.samples]
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float)
    m = {
        "reward/mean": sum(s.reward for s in samples) / len(samples),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
    }
    for name in samples[0].reward_components:
        m[f"reward/{name}"] = sum(s.reward_components[name] for s in samples) / len(samples)
    return m


def sampling_params(cfg, version: int, seed: int) -> SamplingParams:
    return SamplingParams(
        n=cfg.algo.group_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        max_new_tokens=max_tokens_at(cfg, version), seed=seed,
    )


def run(cfg) -> dict:
    with RunContext(cfg) as ctx:  # inputs checked, run_dir and config.yaml; what is opened below, closed at the end
        return _run(cfg, ctx)


def _run(cfg, ctx: RunContext) -> dict:
    run_dir = ctx.run_dir
    model_path = prepare_model(cfg)
    train_set, eval_set = prepare_prompts(cfg, model_path)  # (prompts beyond the engine's context dropped, counted)
    ctx.connect()
    try:
        train = ctx.closing(TrainPool(cfg, model_path), TrainPool.shutdown)
        rollout = ctx.closing(RolloutPool(cfg, model_path, colocate_with=train if colocated(cfg) else None),
                              RolloutPool.shutdown)
        layout = {"train": nodes_of(train.pg), "rollout": [nodes_of(rollout.pg)[b] for b in rollout.bundles]}
        (run_dir / "nodes.json").write_text(json.dumps(layout))  # which node each worker of each pool runs on
        log.info("training pool on %s, rollout pool on %s", layout["train"], layout["rollout"])
        sync = WeightSync(train, rollout)
        workers = WorkerLifecycle(rollout, sync)  # replaces and drains rollout workers; the sync group follows
        pad_id = TokenRules.load(model_path).pad_id
        buffer = RolloutBuffer(cfg, workers, train_set.problems, PromptSampler(len(train_set.problems), cfg.seed),
                               lambda version, seed: sampling_params(cfg, version, seed),
                               keep=has_signal if cfg.algo.filter_uniform_groups else None)
        checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
        step, version, evals, resumed_step, canary_state = 0, 0, {}, None, {}

        if cfg.resume and (resumed := checkpoints.resume(
                lambda path, state: (train.load(str(path)), buffer.load_state_dict(state["buffer"], path)))):
            latest, state = resumed  # (the newest checkpoint that loads: one that cannot is reported, never used)
            step, version, evals = state["step"], state["version"], state["evals"]
            canary_state = state.get("canary", {})
            resumed_step = step
            sync.push(version=version)  # the rollout pool starts from the resumed policy
            log.info("resumed from %s at step %d (policy version %d)", latest, step, version)
        logger = ctx.closing(MetricsLogger(cfg, run_dir, ctx.config_dict, resumed_step), MetricsLogger.close)
        ledger = ctx.closing(GroupLedger(run_dir, resumed_step), GroupLedger.close)
        progress = Progress(cfg.trainer.total_steps, start_step=step)
        saved_step = resumed_step

        def save_checkpoint(settle: bool = True) -> None:
            nonlocal saved_step
            if settle:  # groups generated by older versions cannot be regenerated after a resume: keep them
                buffer.settle(version)
            state = {"step": step, "version": version, "buffer": buffer.state_dict(), "evals": evals,
                     "model_path": str(model_path), "canary": canary.state_dict()}
            checkpoints.save(step, state, lambda d: (train.save(str(d), cfg.checkpoint.save_optimizer),
                                                     buffer.save_groups(d)))
            saved_step = step

        def run_eval(tag: str) -> None:
            evals[tag] = evaluate(cfg, workers, eval_set, step, version)
            logger.log({f"eval/{k}": v for k, v in evals[tag].items()}, step=step)
            progress.note(f"[cyan]eval @ step {step}[/]: " + ", ".join(f"{k} {v:.3f}" for k, v in evals[tag].items()))

        with GracefulStop() as stop, HealthSupervisor(cfg, run_dir, logger, train, workers, stop) as health:
            # no step, no rollout and no worker's heartbeat for stall_minutes: stacks, then the stall's action
            health.watch(lambda: (step, buffer.collected))
            # the engines' log-probs against the trainer's: after each push (and now), and on every batch
            canary = MismatchCanary(cfg, train, workers, [p.prompt for p in eval_set.problems], pad_id,
                                    health.record, stop)
            canary.load_state_dict(canary_state)
            canary_metrics = canary.start(version)
            if cfg.eval.at_start and "base" not in evals:
                run_eval("base")

            totals_before = dict(buffer.worker_totals)  # generation time is counted from one step's end to the next's
            while step < cfg.trainer.total_steps and not stop.requested:
                t_step = time.time()
                # 1-2. a batch of rewarded groups, generated by policy versions >= version - max_staleness
                taken = buffer.take(version, lambda: stop.requested)
                if taken is None:
                    break
                t_wait = time.time() - t_step
                metrics = rollout_metrics(taken.groups + taken.dropped) | buffer.metrics(taken, version)
                ledger.record(step + 1, version, taken.dropped, trained=False)
                ledger.record(step + 1, version, taken.groups, trained=True)

                # 3. advantages (and reference log-probs), 4. update the policy -- unless dynamic sampling dropped
                #    every group: then no update, no new version, no weight push
                t0, batch, sent = time.time(), None, 0
                if taken.groups:
                    batch = build_batch(cfg, taken.groups, pad_id, train)
                    loss = make_loss(cfg, max_tokens_at(cfg, version), masked=canary.escalated)
                    train_stats = train_on(cfg, batch, train, loss, step)
                    metrics.update({f"train/{k}": v for k, v in train_stats.items()})
                    version += 1
                    metrics.update(canary.watch_batch(train_stats, version))
                else:
                    metrics["train/optimizer_steps"] = 0
                    progress.note(f"[yellow]step {step + 1}: all {taken.examined} groups had equal rewards; no "
                                  f"update (algo.max_sampling_rounds={cfg.algo.max_sampling_rounds})[/]")
                t_train = time.time() - t0
                step += 1

                # 5. push the new policy to the rollout pool, which already generates the next batch(es);
                #    top the buffer up with the new version; refresh the reference policy on schedule
                t0 = time.time()
                if batch is not None:
                    sent = sync.push(version=version)
                    canary_metrics |= canary.after_push(version)  # (on-policy: compared before the next batch)
                    if cfg.algo.ref_update_interval and version % cfg.algo.ref_update_interval == 0:
                        train.update_reference()
                if step < cfg.trainer.total_steps:
                    buffer.fill(version)
                t_sync = time.time() - t0

                # 6. log
                t_total = time.time() - t_step
                totals_now = dict(buffer.worker_totals)
                t_gen, t_reward = rollout_seconds(totals_before, totals_now, cfg.rollout.num_workers)
                totals_before = totals_now
                gen_tokens = sum(len(s.response_ids) for g in taken.groups + taken.dropped for s in g.samples)
                train_tokens = int(batch.attention_mask.sum()) if batch is not None else 0
                metrics.update({
                    "time/step_s": t_total, "time/generate_s": t_gen, "time/reward_s": t_reward, "time/train_s": t_train,
                    "time/sync_s": t_sync, "time/wait_for_rollouts_s": t_wait,
                    "time/rollout_idle_s": max(0.0, t_total - t_gen),
                    "time/train_idle_s": max(0.0, t_total - t_train - t_sync),
                    "perf/overlap_efficiency": t_total / max(t_gen, t_train, 1e-9),
                    "perf/gen_tokens_per_s": gen_tokens / max(t_gen, 1e-9),
                    "perf/train_tokens_per_s": train_tokens / max(t_train, 1e-9),
                    "perf/gen_tokens": gen_tokens, "perf/train_tokens": train_tokens,
                    "perf/sync_MB": sent / 2**20, "perf/sync_MB_per_s": sent / 2**20 / max(t_sync, 1e-9),
                    "policy/version": version, "data/epoch": buffer.sampler.epoch,
                    "data/prompts_too_long": train_set.too_long,
                })
                metrics.update(canary_metrics | canary.collect(block=False))  # (what async probes answered since)
                canary_metrics = {}
                metrics.update({f"time/trainer_{k}": v for k, v in train.pop_seconds().items()})
                for k in ("checked", "timeouts", "errors"):
                    metrics[f"verifier/{k}"] = sum(t.verifier.get(k, 0) for t in totals_now.values())
                for k in {k for t in totals_now.values() for k in t.sandbox}:  # code rewards' programs and outcomes
                    metrics[f"sandbox/{k}"] = sum(t.sandbox.get(k, 0) for t in totals_now.values())
                metrics.update(health.check())  # readings of every GPU; its incidents alerted, drained or aborted
                logger.log(metrics, step=step)
                progress.step(step, metrics)
                if cfg.logger.log_samples:
                    logger.log_table("samples", ["prompt", "response", "reward"], [
                        [train_set.problems[g.prompt_index].prompt, g.samples[0].response_text, g.samples[0].reward]
                        for g in taken.groups[: cfg.logger.log_samples]], step=step)

                # 7. checkpoint, 8. evaluate
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    save_checkpoint()
                if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.trainer.total_steps
                        and not stop.requested):
                    run_eval(f"step_{step}")

            if stop.requested:  # stopped early: a resumable checkpoint of exactly where we are, written at once
                if saved_step != step:
                    save_checkpoint(settle=False)
                progress.note(f"[yellow]stopped by {stop.reason} at step {step}[/]; checkpoint written; continue "
                              f"with: r1-launch resume=true run_dir={run_dir}")
                return {"step": step, "version": version, "evals": evals, "run_dir": str(run_dir),
                        "stopped_by": stop.signum, "aborted": stop.aborted, "halted": stop.halted,
                        "buffer": buffer.state_dict()}
            canary.collect(block=True)  # (the last push's probe, if its answer is still out)
            run_eval("final")
            save_checkpoint()
        if "base" in evals:
            print_comparison(evals["base"], evals["final"], progress.console, provenance(cfg, model_path))
        return {"step": step, "version": version, "evals": evals, "run_dir": str(run_dir), "stopped_by": None,
                "aborted": None, "buffer": buffer.state_dict()}
    except SandboxUnavailable as err:  # no reward can be given: stop, keeping every step and prompt (pools still up)
        if saved_step != step:
            save_checkpoint(settle=False)
        message = (f"stopped at step {step}: {err.reason} -- nothing was trained on rewards of programs that did not "
                   f"run. Checkpoint written; once the sandbox works here, continue with: r1-launch resume=true "
                   f"run_dir={run_dir}")
        progress.note(f"[red]{message}[/]")
        raise RuntimeError(message) from None
