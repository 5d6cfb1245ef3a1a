"""The SFT loop of the R1 pipeline (cold start, SFT on rejection-sampled data, distillation), top to bottom.

    take a batch from the SFT mixture (each set's share per batch, from ``sft.datasets``)
    -> one optimizer step of the NLL of the response tokens on the training pool -> log -> checkpoint

The training pool, its engines (HF, Megatron), checkpoints, resume, graceful stop and health are GRPO's; only the
loss (``r1.algo.SFTLoss``) and the data differ. No rollout pool is started. A checkpoint's ``policy/`` is an HF
model directory: the next stage's ``model.path``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from r1.algo import SFTLoss
from r1.checkpoint import CheckpointManager
from r1.data.sft import SFTMixture, collate_examples, load_sft_set
from r1.data.tokens import TokenRules
from r1.health.supervisor import HealthSupervisor
from r1.inputs import prepare_model, sft_paths
from r1.monitoring.loggers import MetricsLogger
from r1.monitoring.progress import Progress
from r1.monitoring.stop import GracefulStop
from r1.run_context import RunContext
from r1.workers.pools import TrainPool

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    with RunContext(cfg) as ctx:  # inputs checked, run_dir and config.yaml; what is opened below, closed at the end
        return _run(cfg, ctx)


def _run(cfg, ctx: RunContext) -> dict:
    run_dir = ctx.run_dir
    model_path = prepare_model(cfg)
    tokens = TokenRules.load(model_path)
    sets = [load_sft_set(source, path, cfg.data.template, tokens, cfg.sft.max_tokens)
            for source, path in zip(cfg.sft.datasets, sft_paths(cfg), strict=True)]
    data = SFTMixture(sets, [s.weight for s in cfg.sft.datasets], cfg.seed)
    skipped = {f"data/skipped/{Path(s.path).stem}/{why}": n for s in sets for why, n in s.skipped.items()}
    ctx.connect()
    train = ctx.closing(TrainPool(cfg, model_path), TrainPool.shutdown)
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    step, resumed_step = 0, None
    if cfg.resume and (resumed := checkpoints.resume(
            lambda path, state: (train.load(str(path)), data.load_state_dict(state["data"])))) is not None:
        latest, state = resumed
        step = resumed_step = state["step"]
        log.info("resumed from %s at step %d", latest, step)
    logger = ctx.closing(MetricsLogger(cfg, run_dir, ctx.config_dict, resumed_step), MetricsLogger.close)
    progress = Progress(cfg.trainer.total_steps, start_step=step)
    progress.note(f"SFT on {', '.join(f'{len(s.examples)} rows of {s.path}' for s in sets)}"
                  + (f"; skipped {skipped}" if skipped else ""))
    loss, saved_step = SFTLoss(), resumed_step

    def save_checkpoint() -> None:
        nonlocal saved_step
        state = {"step": step, "data": data.state_dict(), "model_path": str(model_path)}
        checkpoints.save(step, state, lambda d: train.save(str(d), cfg.checkpoint.save_optimizer))
        saved_step = step

    with GracefulStop() as stop, HealthSupervisor(cfg, run_dir, logger, train, None, stop) as health:
        health.watch(lambda: (step, 0))
        while step < cfg.trainer.total_steps and not stop.requested:
            t0 = time.time()
            batch = collate_examples(data.next_batch(cfg.sft.batch_size), tokens.pad_id)
            stats = train.train_step(batch, loss)
            step += 1
            took = time.time() - t0
            response_tokens = int(batch.response_mask.sum())
            metrics = {f"train/{k}": v for k, v in stats.items()} | {
                "time/step_s": took, "perf/train_tokens": int(batch.attention_mask.sum()),
                "perf/train_tokens_per_s": int(batch.attention_mask.sum()) / max(took, 1e-9),
                "sft/response_tokens": response_tokens, "sft/response_length_mean": response_tokens / len(batch),
                **{f"data/epoch/{Path(s.path).stem}": e for s, e in zip(sets, data.epochs, strict=True)},
                **skipped,
            }
            metrics.update({f"time/trainer_{k}": v for k, v in train.pop_seconds().items()})
            metrics.update(health.check())
            logger.log(metrics, step=step)
            progress.sft_step(step, metrics)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                save_checkpoint()
        if saved_step != step:
            save_checkpoint()
        if stop.requested:
            progress.note(f"[yellow]stopped by {stop.reason} at step {step}[/]; checkpoint written; continue "
                          f"with: r1-launch resume=true run_dir={run_dir}")
    return {"step": step, "run_dir": str(run_dir), "policy": str(checkpoints.latest() / "policy"),
            "stopped_by": stop.signum, "aborted": stop.aborted}
