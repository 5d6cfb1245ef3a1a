"""A verifiable toy task for the embedded default: sums of small numbers, in the R1-Zero format.

The tiny base model is pretrained on a *mixture* of solution styles, like a web-scale base model that has seen both
careful and sloppy writing:

* ``careful``  a running sum, one addition per step, inside <think>, then the sum (always right);
* ``careless`` an empty-ish <think> and a rounded guess in <answer> (right only when the sum is a multiple of 10);
* ``malformed`` the right idea in a broken layout (missing or unclosed tags), which the format reward rejects.

So the base model *can* solve the task but mostly doesn't bother to think: exactly the situation in which R1-Zero's
GRPO with accuracy + format rewards should teach it to reason before answering (response length grows, accuracy
grows). Held-out problems are a disjoint set of operand tuples.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from r1.data.template import apply_template

STYLES = ("careful", "careless", "malformed")


def careful_solution(operands: tuple[int, ...]) -> str:
    """Running sum, one addition per step: ``3 + 5 = 8 , 8 + 7 = 15 , so 15``."""
    steps, total = [], operands[0]
    for x in operands[1:]:
        steps.append(f"{total} + {x} = {total + x} ,")
        total += x
    return f"<think> {' '.join(steps)} so {total} </think> <answer> {total} </answer>"


def careless_solution(operands: tuple[int, ...]) -> str:
    guess = round(sum(operands) / 10.0) * 10
    return f"<think> easy </think> <answer> {guess} </answer>"


def malformed_solution(operands: tuple[int, ...], rng: random.Random) -> str:
    """Layouts the format reward rejects. None starts like a careful solution, so RL can tell the styles apart
    from the first token on (a shared prefix would make careful thinking pay for sloppy formatting)."""
    s = sum(operands)
    return rng.choice(
        [
            f"<answer> {s} </answer>",
            f"the answer is {s}",
            f"<think> easy <answer> {s} </answer>",
            f"<think> easy </think> {s}",
        ]
    )


def is_held_out(operands: tuple[int, ...]) -> bool:
    """Deterministic ~10% split on the operands, so train and eval problems never overlap."""
    return sum(x * p for x, p in zip(operands, (131, 17, 53, 29, 71, 37))) % 10 == 3


def question(operands: tuple[int, ...]) -> str:
    return "Compute " + " + ".join(map(str, operands))


def all_problems(num_operands: int, low: int, high: int, held_out: bool) -> list[tuple[int, ...]]:
    return [ops for ops in itertools.product(range(low, high + 1), repeat=num_operands) if is_held_out(ops) == held_out]


def write_prompt_files(out_dir: Path, *, num_operands: int, low: int, high: int) -> tuple[Path, Path]:
    """``train.jsonl`` and ``eval.jsonl`` with ``prompt``/``answer`` fields, in the format any user dataset uses."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, held_out in (("train", False), ("eval", True)):
        rows = [
            {"prompt": question(ops), "answer": str(sum(ops))}
            for ops in all_problems(num_operands, low, high, held_out)
        ]
        random.Random(0).shuffle(rows)  # so a prefix (eval.max_problems) is a fair sample
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def pretraining_corpus(
    num_docs: int, *, num_operands: int, low: int, high: int, mix: dict[str, float], seed: int,
    template: str = "r1_zero",
) -> list[str]:
    """Documents ``template(question) + " " + solution`` drawn from training problems only, styles per ``mix``."""
    rng = random.Random(seed)
    problems = all_problems(num_operands, low, high, held_out=False)
    styles, weights = zip(*[(s, mix[s]) for s in STYLES])
    docs = []
    for _ in range(num_docs):
        ops = rng.choice(problems)
        style = rng.choices(styles, weights)[0]
        if style == "careful":
            solution = careful_solution(ops)
        elif style == "careless":
            solution = careless_solution(ops)
        else:
            solution = malformed_solution(ops, rng)
        docs.append(apply_template(question(ops), template) + " " + solution)
    return docs
