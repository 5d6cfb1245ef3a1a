"""Load problems from local jsonl or parquet files; skip and count rows that are unusable.

A row is a math problem (``prompt`` and a scalar ``answer``) or a coding problem (``prompt`` and ``tests``: a list,
or a JSON string of a list as LiveCodeBench stores it, of ``{"input": ..., "output": ...}`` stdin/stdout pairs and/or
``{"assert": "assert f(2) == 4"}`` call-based checks). Field names are ``data.prompt_field`` / ``answer_field`` /
``tests_field``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


from r1.types import CodeTest, Reference


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str = ""  # math: the reference answer
    tests: tuple[CodeTest, ...] = ()  # code: what the answer's program must pass

    @property
    def reference(self) -> Reference:
        return Reference(self.answer, self.tests)


@dataclass
class LoadedPrompts:
    problems: list[Problem]
    skipped: int
    path: str
    too_long: int = 0  # prompts dropped at load: they do not fit the rollout engine's context


def parse_tests(value: object) -> tuple[CodeTest, ...]:
    """A row's test cases; ``()`` if there are none or any is malformed (the row is then not a coding problem)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return ()
    if not isinstance(value, list):
        return ()
    tests = []
    for case in value:
        if not isinstance(case, dict):
            return ()
        case = {k: v for k, v in case.items() if v is not None}  # (parquet gives every struct all the keys)
        if isinstance(case.get("assert"), str) and case["assert"].strip() and not {"input", "output"} & case.keys():
            tests.append(CodeTest(assertion=case["assert"]))
        elif isinstance(case.get("input"), str) and isinstance(case.get("output"), str) and "assert" not in case:
            tests.append(CodeTest(stdin=case["input"], stdout=case["output"]))
        else:
            return ()
    return tuple(tests)


def _row_to_problem(row: object, prompt_field: str, answer_field: str, tests_field: str = "tests",
                    allow_open: bool = False) -> Problem | None:
    if not isinstance(row, dict):
        return None
    prompt, answer = row.get(prompt_field), row.get(answer_field)
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    if allow_open and answer is None and row.get(tests_field) is None:
        return Problem(prompt.strip())  # a general prompt (all-scenario RL: the reward model scores it)
    if row.get(tests_field) is not None:
        tests = parse_tests(row[tests_field])
        return Problem(prompt.strip(), tests=tests) if tests else None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return None
    answer = str(answer).strip()
    return Problem(prompt.strip(), answer) if answer else None


def read_rows(path: Path) -> tuple[list[object], int]:
    """Rows of the file and the number of lines that were not even valid JSON."""
    if path.suffix == ".parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=str(path), split="train")), 0
    try:
        import datasets

        return list(datasets.load_dataset("json", data_files=str(path), split="train")), 0
    except Exception:  # noqa: BLE001 -- malformed lines make `datasets` refuse the file; fall back to line by line
        rows, broken = [], 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                broken += 1
        return rows, broken


def load_prompts(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer",
                 tests_field: str = "tests", allow_open: bool = False) -> LoadedPrompts:
    """All usable rows of ``path``. A row without a non-empty string prompt and either a scalar answer or well-formed
    tests is skipped (with ``allow_open``, a row with neither is a general prompt)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist (set data.train_path / data.eval_path)")
    rows, skipped = read_rows(path)
    problems = []
    for row in rows:
        problem = _row_to_problem(row, prompt_field, answer_field, tests_field, allow_open)
        if problem is None:
            skipped += 1
        else:
            problems.append(problem)
    if skipped:
        log.warning("%s: skipped %d bad rows (need string %r and scalar %r or test cases %r)", path, skipped,
                    prompt_field, answer_field, tests_field)
    if not problems:
        raise ValueError(f"{path} has no usable rows with fields {prompt_field!r} and {answer_field!r} or "
                         f"{tests_field!r}")
    return LoadedPrompts(problems, skipped, str(path))


class PromptSampler:
    """Epoch-shuffled, seeded order over the dataset; its position is part of the checkpoint so resume is exact."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        import torch

        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def next_indices(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.size - self.index)
            out.extend(self._order[self.index : self.index + take])
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"checkpoint was taken on a dataset of {state['size']} rows, this one has {self.size}")
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
