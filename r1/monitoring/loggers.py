"""Metric sinks. Every run writes ``metrics.jsonl`` in its run dir; ``logger.backend=wandb`` adds W&B.

W&B goes offline automatically when no API key is configured, so a laptop run never blocks on a login; the run
can be uploaded later with ``wandb sync``. Only the resolved config is sent, which holds no secrets (keys come
from the environment and are never copied into configs or logs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from r1.monitoring.step_log import open_step_log


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    def __init__(self, cfg, run_dir: Path, config_dict: dict, resumed_step: int | None = None):
        self._file = open_step_log(Path(run_dir) / "metrics.jsonl", resumed_step)
        self.wandb_run = None
        if cfg.logger.backend == "wandb":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.name, dir=str(run_dir),
                config=config_dict, mode=wandb_mode(cfg.logger.mode), resume="allow",
                id=wandb_run_id(run_dir),
            )

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        # A resumed W&B run continues after the last step it holds (``starting_step``); steps the resumed run redoes
        # before that (killed after logging, before checkpointing) keep their first values there, as W&B's history
        # is append-only. metrics.jsonl, truncated at the checkpoint, holds the redone values.
        if self.wandb_run is not None and step >= self.wandb_run.starting_step:
            self.wandb_run.log(metrics, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def alert(self, title: str, text: str, level: str) -> None:
        """A W&B alert (``level``: INFO, WARN or ERROR), which the project's alert settings route to Slack or
        e-mail. W&B drops a repeat of the same title within a minute."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level))

    def summary_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """A table in the run's summary (replaced by each call): the whole story, not a series."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.summary[name] = wandb.Table(columns=columns, data=rows)

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_run_id(run_dir: Path) -> str:
    """Same run dir -> same W&B run id, so a resumed run continues its curves."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
