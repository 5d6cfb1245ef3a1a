"""What ``r1-launch`` runs: the loop of the config's ``stage`` (the launchers on every cluster call this), and what a
finished stage leaves for the next one of a pipeline (``launcher/pipeline.py``):

    <run_dir>/stage.json   written last, only when the stage ran to its end: {"stage", "outputs", "finished"}
    <run_dir>/policy       grpo and sft: the final checkpoint's policy (a link), the next stage's model.path
    <run_dir>/<rejection.output>   rejection_sampling: the SFT set
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DONE_FILE = "stage.json"


def run(cfg) -> dict:
    if cfg.stage == "sft":
        from r1.sft import run as run_stage
    elif cfg.stage == "rejection_sampling":
        from r1.rejection_sampling import run as run_stage
    elif cfg.stage == "eval":
        from r1.eval.benchmarks import run as run_stage
    elif cfg.stage == "report":
        from r1.report import run as run_stage
    else:
        from r1.driver import run as run_stage
    result = run_stage(cfg)
    if not result.get("stopped_by") and not result.get("aborted") and not result.get("halted"):
        mark_done(cfg, result)
    return result


def mark_done(cfg, result: dict) -> None:
    run_dir = Path(cfg.run_dir)
    outputs: dict[str, str] = {}
    if cfg.stage in ("grpo", "sft"):
        from r1.checkpoint import CheckpointManager

        latest = CheckpointManager(run_dir / "checkpoints").latest()
        link = run_dir / "policy"
        tmp = run_dir / f"policy.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to((latest / "policy").relative_to(run_dir))
        os.replace(tmp, link)
        outputs["policy"] = str(link)
    elif cfg.stage == "rejection_sampling":
        outputs["sft_data"] = result["output"]
    elif cfg.stage == "eval":
        outputs["summary"] = str(run_dir / "eval" / "summary.json")
    elif cfg.stage == "report":
        outputs["report"] = result["report"]
    done = {"stage": str(cfg.stage), "name": cfg.name, "outputs": outputs, "finished": time.time()}
    tmp = run_dir / f"{DONE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(done, indent=1))
    os.replace(tmp, run_dir / DONE_FILE)


def is_done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DONE_FILE).is_file()
