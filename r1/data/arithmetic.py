"""A verifiable toy task for the embedded default: sums of small numbers, in the R1-Zero format.

The tiny base model is pretrained on a *mixture* of solution styles, like a web-scale base model that has seen both
careful and sloppy writing:

* ``careful``  a running sum, one addition per step, inside <think>, then the sum (always right);
* ``careless`` an empty-ish <think> and a rounded guess in <answer> (right only when the sum is a multiple of 10);
* ``malformed`` the right idea in a broken layout (missing or unclosed tags), which the format reward rejects;
* ``practice`` no question and no template, just a running sum (``3 + 5 = 8 , 8 + 7 = 15 ,``): arithmetic seen
  outside any answer, as a base model has seen worked sums in textbooks. It teaches the skill the careful style
  needs without making the careful style more likely after a question, so the base can add reliably and still
  mostly not bother.

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

STYLES = ("careful", "careless", "malformed", "practice")


def careful_solution(operands: tuple[int, ...]) -> str:
    """Running sum, one addition per step: ``3 + 5 = 8 , 8 + 7 = 15 , so 15``."""
    return f"<think> {practice_text(operands)} so {sum(operands)} </think> <answer> {sum(operands)} </answer>"


def practice_text(operands: tuple[int, ...]) -> str:
    """The running sum alone: ``3 + 5 = 8 , 8 + 7 = 15 ,``."""
    steps, total = [], operands[0]
    for x in operands[1:]:
        steps.append(f"{total} + {x} = {total + x} ,")
        total += x
    return " ".join(steps)


def long_cot_solution(operands: tuple[int, ...]) -> str:
    """The cold-start style (R1 format: reasoning, then a summary): the running sum, then a check that undoes it
    step by step, then the answer: ``3 + 5 = 8 , 8 + 7 = 15 , so 15 , check 15 - 7 = 8 , 8 - 5 = 3 , ok``."""
    steps, total = [], operands[0]
    for x in operands[1:]:
        steps.append(f"{total} + {x} = {total + x} ,")
        total += x
    back, value = [], total
    for x in reversed(operands[1:]):
        back.append(f"{value} - {x} = {value - x} ,")
        value -= x
    return f"<think> {' '.join(steps)} so {total} , check {' '.join(back)} ok </think> <answer> {total} </answer>"


def write_long_cot_file(path: Path, *, size: int, num_operands: int, low: int, high: int, seed: int = 0) -> Path:
    """``size`` training problems (never held-out ones) with ``prompt``/``response`` in the long-CoT style: the
    embedded task's cold-start data, in the format any user's SFT file has."""
    rng = random.Random(seed)
    problems = all_problems(num_operands, low, high, held_out=False)
    rows = [{"prompt": question(ops), "response": " " + long_cot_solution(ops)}
            for ops in (rng.choice(problems) for _ in range(size))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def write_direct_answer_file(path: Path, *, size: int, low: int, high: int, seed: int = 0) -> Path:
    """The embedded task's non-reasoning data: sums of two numbers answered at once, with an empty chain of thought
    (as R1's SFT data answers simple queries without one)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        ops = (rng.randint(low, high), rng.randint(low, high))
        rows.append({"prompt": question(ops), "response": f" <think> </think> <answer> {sum(ops)} </answer>"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


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


def write_prompt_files(out_dir: Path, *, num_operands: int, low: int, high: int,
                       open_fraction: float = 0.0) -> tuple[Path, Path]:
    """``train.jsonl`` and ``eval.jsonl`` with ``prompt``/``answer`` fields, in the format any user dataset uses.
    ``open_fraction`` of the training rows are general prompts without an answer ("Explain 3 + 4 + 5 + 6": all-
    scenario RL's, scored by the reward model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, held_out in (("train", False), ("eval", True)):
        rows = [
            {"prompt": question(ops), "answer": str(sum(ops))}
            for ops in all_problems(num_operands, low, high, held_out)
        ]
        random.Random(0).shuffle(rows)  # so a prefix (eval.max_problems) is a fair sample
        if not held_out and open_fraction:
            for row in rows[: int(open_fraction * len(rows))]:
                row["prompt"] = row["prompt"].replace("Compute", "Explain", 1)
                del row["answer"]
            random.Random(1).shuffle(rows)
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
    styles, weights = zip(*[(s, mix.get(s, 0.0)) for s in STYLES])
    docs = []
    for _ in range(num_docs):
        ops = rng.choice(problems)
        style = rng.choices(styles, weights)[0]
        if style == "practice":
            docs.append(practice_text(ops))
            continue
        if style == "careful":
            solution = careful_solution(ops)
        elif style == "careless":
            solution = careless_solution(ops)
        else:
            solution = malformed_solution(ops, rng)
        docs.append(apply_template(question(ops), template) + " " + solution)
    return docs
