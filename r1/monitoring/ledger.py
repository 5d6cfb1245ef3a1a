"""``groups.jsonl``: one line per prompt group trained on (step, uid, prompt, policy version, staleness, reward).

The audit trail of the rollout buffer: every uid appears once, whatever was killed, discarded or resumed. On
resume, lines of steps after the checkpoint are dropped (those steps are redone).
"""

from __future__ import annotations

import json
from pathlib import Path

from r1.types import Group


class GroupLedger:
    def __init__(self, run_dir: Path, resumed_step: int | None = None):
        self.path = Path(run_dir) / "groups.jsonl"
        if resumed_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self._file = self.path.open("a")

    def record(self, step: int, groups: list[Group]) -> None:
        for g in groups:
            self._file.write(json.dumps({
                "step": step, "uid": g.uid, "prompt_index": g.prompt_index, "version": g.policy_version,
                "staleness": step - 1 - g.policy_version,
                "reward_mean": sum(s.reward for s in g.samples) / len(g.samples),
            }) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_ledger(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "groups.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
