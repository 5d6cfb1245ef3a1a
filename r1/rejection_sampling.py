"""Rejection sampling (DeepSeek-R1, stage 3), top to bottom.

    the data's training prompts, in shards of ``rejection.prompts_per_shard``
    -> N samples per prompt through the rollout pool (every worker busy, two shards in flight each)
    -> keep the correct, readable ones (``r1.data.filters``), deduplicated, at most ``keep_per_prompt`` per prompt
    -> each finished shard written atomically -> merged into ``<run_dir>/<rejection.output>``, the next SFT set

Every row carries its provenance: the model, its training step, the sampling parameters and seed, its shard and
sample. A shard is sampled with its own seed, and a written shard is never sampled again: a run killed at any point
and started again with the same ``run_dir`` samples only the shards it had not written, and writes no sample twice.
A rollout worker that dies is replaced and its shard redone once (``r1.workers.lifecycle``: with two shards in
flight on it, both are redone, and it is replaced once); a shard lost twice is left unwritten and counted - the
same command samples it again. A problem its worker could not make (a reward raised, a prompt beyond the context)
is counted under ``skipped/<reason>``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray.exceptions import RayActorError, RayTaskError

from r1.data.filters import dedup_key, rejection_reason
from r1.inputs import prepare_model, prepare_prompts
from r1.monitoring.loggers import MetricsLogger
from r1.monitoring.progress import Progress
from r1.rewards.sandbox import SandboxUnavailable
from r1.run_context import RunContext
from r1.types import SamplingParams
from r1.workers.lifecycle import WorkerLifecycle, failure_reason, redo_once
from r1.workers.pools import RolloutPool

log = logging.getLogger(__name__)
IN_FLIGHT_PER_WORKER = 2


def checkpoint_step(model_path: str) -> int | None:
    """The training step of ``<run>/checkpoints/step_N/policy`` (its driver state), else None."""
    state = Path(model_path).parent / "driver_state.json"
    return json.loads(state.read_text()).get("step") if state.is_file() else None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardStore:
    """``<run_dir>/rejection/``: ``plan.json`` (what the shards were sampled with: a resumed run must match it) and
    one ``shard_NNNNNN.jsonl`` per finished shard (its existence is the shard's completion), with its counts beside
    it."""

    def __init__(self, root: Path, plan: dict):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        saved = root / "plan.json"
        if saved.is_file() and json.loads(saved.read_text()) != plan:
            raise ValueError(f"{root} holds shards sampled with another plan ({saved}): use a new run_dir, or the "
                             "same model, data, seed and rejection settings")
        write_atomic(saved, json.dumps(plan, indent=1))

    def path(self, shard: int) -> Path:
        return self.root / f"shard_{shard:06d}.jsonl"

    def done(self, shard: int) -> bool:
        return self.path(shard).is_file()

    def write(self, shard: int, rows: list[dict], counts: Counter) -> None:
        write_atomic(self.root / f"shard_{shard:06d}.counts.json", json.dumps(counts))
        write_atomic(self.path(shard), "".join(json.dumps(r) + "\n" for r in rows))  # last: the shard is done

    def counts(self, shard: int) -> Counter:
        return Counter(json.loads((self.root / f"shard_{shard:06d}.counts.json").read_text()))

    def merge(self, shards: int, output: Path) -> tuple[int, int]:
        """All shards in order into ``output`` (jsonl or parquet), duplicates across shards dropped; (rows,
        duplicates)."""
        seen, rows, duplicates = set(), [], 0
        for shard in range(shards):
            if not self.done(shard):  # (lost twice: not written by this run)
                continue
            for line in self.path(shard).read_text().splitlines():
                row = json.loads(line)
                key = dedup_key(row["prompt"], row["response"])
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                rows.append(row)
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
            pq.write_table(pa.Table.from_pylist(rows), tmp)
            os.replace(tmp, output)
        else:
            write_atomic(output, "".join(json.dumps(r) + "\n" for r in rows))
        return len(rows), duplicates


def select(groups, problems, rules, language: str, provenance: dict, shard: int) -> tuple[list[dict], Counter]:
    """The kept samples of one shard's groups as SFT rows, and the count of every outcome."""
    rows, counts = [], Counter()
    for group in groups:
        if group.skipped:  # its worker could not make it
            counts[f"skipped/{group.skipped}"] += 1
            continue
        prompt = problems[group.prompt_index].prompt
        seen, kept = set(), 0
        for j, sample in enumerate(group.samples):
            counts["samples"] += 1
            reason = rejection_reason(sample, rules, language)
            key = dedup_key(prompt, sample.response_text)
            if reason is None and key in seen:
                reason = "duplicate"
            if reason is None and kept >= rules.keep_per_prompt:
                reason = "over_keep_per_prompt"
            if reason is not None:
                counts[f"rejected/{reason}"] += 1
                continue
            seen.add(key)
            kept += 1
            counts["kept"] += 1
            rows.append({"prompt": prompt, "response": sample.response_text,
                         "provenance": provenance | {"shard": shard, "prompt_index": group.prompt_index, "sample": j},
                         "reward": sample.reward_components})
    return rows, counts


def run(cfg) -> dict:
    with RunContext(cfg) as ctx:  # inputs checked, run_dir and config.yaml; what is opened below, closed at the end
        return _run(cfg, ctx)


def _run(cfg, ctx: RunContext) -> dict:
    run_dir = ctx.run_dir
    rules = cfg.rejection
    model_path = prepare_model(cfg)
    loaded = prepare_prompts(cfg, model_path)[0]  # (prompts beyond the engine's context dropped, counted)
    problems = loaded.problems[: rules.num_prompts or None]
    size = rules.prompts_per_shard
    shards = [list(range(start, min(start + size, len(problems)))) for start in range(0, len(problems), size)]
    sampling = {"temperature": rules.temperature, "top_p": rules.top_p, "max_new_tokens": rules.max_new_tokens,
                "samples_per_prompt": rules.samples_per_prompt, "seed": cfg.seed}
    provenance = {"model": str(model_path), "step": checkpoint_step(str(model_path)), **sampling}
    store = ShardStore(run_dir / "rejection", {"model": str(model_path), "prompts": len(problems),
                                               "prompts_per_shard": size, **sampling,
                                               "filters": OmegaConf.to_container(rules, resolve=True)})
    todo = [s for s in range(len(shards)) if not store.done(s)]
    finished = len(shards) - len(todo)
    if finished:
        log.info("resuming: %d of %d shards already written in %s", finished, len(shards), store.root)
    ctx.connect()
    rollout = ctx.closing(RolloutPool(cfg, model_path), RolloutPool.shutdown)
    logger = ctx.closing(MetricsLogger(cfg, run_dir, ctx.config_dict, finished), MetricsLogger.close)
    progress = Progress(len(shards), start_step=finished)
    totals = sum((store.counts(s) for s in range(len(shards)) if store.done(s)), Counter())
    workers = WorkerLifecycle(rollout)  # replaces a dead worker once; its shards are redone once
    inflight: dict = {}  # ref -> (shard, ticket)
    queue, losses, unwritten = list(todo), Counter(), []
    while queue or inflight:
        while queue and len(inflight) < IN_FLIGHT_PER_WORKER * len(workers.live):
            shard = queue.pop(0)
            busy = Counter(ticket.worker for _, ticket in inflight.values())
            worker = min(workers.live, key=lambda w: busy[w])
            params = SamplingParams(n=rules.samples_per_prompt, temperature=rules.temperature, top_p=rules.top_p,
                                    max_new_tokens=rules.max_new_tokens, seed=cfg.seed * 1_009 + shard)
            batch = [(i, problems[i].prompt, problems[i].reference) for i in shards[shard]]
            ref, ticket = workers.submit(worker, batch, params, shards[shard], 0)
            inflight[ref] = (shard, ticket)
        (ref,), _ = ray.wait(list(inflight), num_returns=1)
        shard, ticket = inflight.pop(ref)
        t0 = time.time()
        try:
            result = ray.get(ref)
        except SandboxUnavailable:
            raise
        except (RayActorError, RayTaskError) as err:
            reason = failure_reason(err)
            if isinstance(err, RayActorError):
                workers.lost(ticket)
            if redo_once(losses, [shard])[0]:
                log.warning("shard %d lost (%s, worker %d): redone", shard, reason, ticket.worker)
                totals["shards_redone"] += 1
                queue.insert(0, shard)
            else:
                log.error("shard %d lost twice (%s): not written; run the same command again to sample it",
                          shard, reason)
                totals[f"shards_lost_twice/{reason}"] += 1
                unwritten.append(shard)
            continue
        rows, counts = select(result.groups, problems, rules, cfg.reward.language, provenance, shard)
        store.write(shard, rows, counts)
        totals += counts
        finished += 1
        logger.log({f"rejection/{k}": v for k, v in totals.items()} | {"rejection/shards": finished,
                                                                       "time/select_s": time.time() - t0},
                   step=finished)
        progress.note(f"[bold]shard {finished}/{len(shards)}[/] kept {totals['kept']} of {totals['samples']} "
                      f"samples ({_reasons(totals)}) ETA {progress.eta_text(finished)}")
    rows, duplicates = store.merge(len(shards), run_dir / rules.output)
    replaced = rollout.replaced
    summary = dict(totals) | {"rows": rows, "duplicates_across_shards": duplicates, "prompts": len(problems),
                              "workers_replaced": replaced, "unwritten_shards": unwritten,
                              "prompts_too_long": loaded.too_long}
    write_atomic(run_dir / "rejection" / "summary.json", json.dumps(summary, indent=1))
    progress.note(f"wrote {rows} rows to {run_dir / rules.output} ({_reasons(totals)})")
    if unwritten:
        progress.note(f"[red]{len(unwritten)} shard(s) lost twice and not written ({unwritten}): run the same "
                      f"command again to sample them[/]")
    return {"run_dir": str(run_dir), "output": str(run_dir / rules.output), "summary": summary,
            "stopped_by": None, "aborted": None}


def _reasons(totals: Counter) -> str:
    return ", ".join(f"{k.removeprefix('rejected/')} {v}" for k, v in sorted(totals.items())
                     if k.startswith("rejected/")) or "none rejected"
