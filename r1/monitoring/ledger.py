"""``groups.jsonl``: one line per prompt group consumed by a step: trained on, or dropped by dynamic sampling.

The audit trail of the rollout buffer: every uid appears once, whatever was killed, discarded or resumed (``step,
uid, prompt_index, version, staleness, reward_mean, trained``). On resume, lines of steps after the checkpoint are
dropped (those steps are redone), the same rule as ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from r1.monitoring.step_log import open_step_log
from r1.types import Group


class GroupLedger:
    def __init__(self, run_dir: Path, resumed_step: int | None = None):
        self._file = open_step_log(Path(run_dir) / "groups.jsonl", resumed_step)

    def record(self, step: int, version: int, groups: list[Group], *, trained: bool) -> None:
        """Groups consumed by ``step``, whose update was made from policy ``version``."""
        for g in groups:
            self._file.write(json.dumps({
                "step": step, "uid": g.uid, "prompt_index": g.prompt_index, "version": g.policy_version,
                "staleness": version - g.policy_version,
                "reward_mean": sum(s.reward for s in g.samples) / len(g.samples), "trained": trained,
            }) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_ledger(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "groups.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
