"""``+experiment=eval``: two checkpoints of different architectures on a local benchmark file that mixes math and code
problems; the per-problem results are checked against math-verify and a plain majority count, the summary against
the per-problem rows, the table against the summary."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from r1.eval.benchmarks import comparison_table, labels
from r1.rewards.verifier import check_equivalent
from tests.conftest import TINY, compose


def test_labels_are_the_shortest_distinct_path_tails():
    assert labels(["/r/a/checkpoints/step_000010/policy", "/r/b/checkpoints/step_000010/policy"]) == [
        "a/checkpoints/step_000010", "b/checkpoints/step_000010"]
    assert labels(["/m/qwen", "/m/llama"]) == ["qwen", "llama"]


def test_the_comparison_table_has_a_row_per_checkpoint_and_benchmark():
    m = {"pass@1": 0.25, "cons@4": 0.5, "format_rate": 1.0, "language": 0.875, "response_length": 12.25,
         "problems": 8.0}
    table = comparison_table({"a": {"aime": m}, "b": {"aime": m | {"pass@1": 0.5}}}, k=4)
    assert table.splitlines()[0] == ("| checkpoint | benchmark | problems | pass@1 | cons@4 | format_rate | language | "
                                     "response_length |")
    assert table.splitlines()[2:] == ["| a | aime | 8 | 25.0 | 50.0 | 100.0 | 87.5 | 12.2 |",
                                      "| b | aime | 8 | 50.0 | 50.0 | 100.0 | 87.5 | 12.2 |"]


CODE_PROMPT = "Write a program that doubles n."
PROGRAM = "print(2 * int(input()))"


def _coder(tiny_model: str, cfg, out_dir) -> str:
    """The tiny model taught one answer to the coding prompt - a program, in the R1 format - by SFT on that one row
    until it says it near-certainly (the untrained models write no program: without this, the evaluation's code
    rows would never run one)."""
    import torch

    from r1.algo.sft import SFTLoss
    from r1.data.template import apply_template
    from r1.data.tokens import TokenRules, load_tokenizer
    from r1.engines.hf_train import HFTrainEngine
    from r1.types import TrainBatch

    rules = TokenRules.load(tiny_model)
    prompt = rules.encode_batch([apply_template(CODE_PROMPT, cfg.data.template, rules.tokenizer)])[0]
    answer = f"<think>double it</think> <answer>\n```python\n{PROGRAM}\n```\n</answer>"
    response = rules.tokenizer(answer, add_special_tokens=False)["input_ids"] + [rules.eos_id]
    ids = torch.tensor([prompt + response])
    mask = torch.zeros(ids.shape)
    mask[0, len(prompt):] = 1
    engine = HFTrainEngine(tiny_model, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=0,
                           grad_clip=1.0, micro_batch_size=1, with_reference=False)
    for _ in range(300):
        if engine.train_step(TrainBatch(ids, torch.ones_like(ids), mask, torch.zeros(1)), SFTLoss())["nll"] < 2e-3:
            break
    engine.save(out_dir, with_optimizer=False)
    load_tokenizer(tiny_model).save_pretrained(out_dir / "policy")
    return str(out_dir / "policy")


@pytest.mark.slow
def test_eval_compares_checkpoints_on_local_benchmarks(ray_local, bwrap, tiny_model, tiny_llama, cache_dir, tmp_path):
    from r1.stages import run

    bench = tmp_path / "mini.jsonl"
    rows = [{"prompt": f"Compute {a} + {b} + {c} + {d}", "answer": str(a + b + c + d)}
            for a, b, c, d in [(1, 2, 3, 4), (5, 0, 2, 1), (9, 9, 1, 0), (3, 3, 3, 3), (7, 1, 0, 2)]]
    rows.append({"prompt": CODE_PROMPT, "tests": [{"input": "2\n", "output": "4\n"}, {"input": "-5\n",
                                                                                    "output": "-10\n"}]})
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [*TINY, "+experiment=eval", "logger=none", f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}",
                 "eval.k=4", "eval.max_new_tokens=48", "rollout.num_workers=1",
                 f"eval.benchmarks=[{{name: mini, path: {bench}}}]"]
    coder = _coder(tiny_model, compose(overrides), tmp_path / "coder")
    checkpoints = [tiny_model, tiny_llama, coder]
    out = run(compose([*overrides, f"eval.checkpoints=[{','.join(checkpoints)}]"]))
    names = labels(checkpoints)
    assert list(out["summary"]) == names
    for name in names:
        problems = [json.loads(x) for x in (tmp_path / "run" / "eval" / name / "mini.jsonl").read_text().splitlines()]
        assert len(problems) == len(rows)
        for row, problem in zip(rows, problems):
            assert problem["prompt"] == row["prompt"] and len(problem["answers"]) == 4
            if "tests" in row and name == names[2]:  # the coder's program, run in the sandbox on both tests
                assert problem["answers"] == [PROGRAM] * 4 and problem["pass1"] == 1.0, problem
                continue
            if "tests" in row:  # an untrained model writes no program: no answer, nothing passes
                assert problem["answers"] == [None] * 4 and problem["pass1"] == 0.0
                continue
            correct = [a is not None and check_equivalent(row["answer"], a) for a in problem["answers"]]
            assert problem["correct"] == correct and problem["pass1"] == sum(correct) / 4
            votes = Counter(a for a in problem["answers"] if a)
            if votes and len({n for n in votes.values() if n == max(votes.values())}) == 1 and \
                    list(votes.values()).count(max(votes.values())) == 1:  # (an unambiguous majority)
                majority = votes.most_common(1)[0][0]
                assert problem["cons"] == float(check_equivalent(row["answer"], majority))
        summary = out["summary"][name]["mini"]
        assert summary["pass@1"] == pytest.approx(sum(p["pass1"] for p in problems) / len(problems))
        assert summary["problems"] == len(rows)
    saved = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(out["summary"]))
    assert (tmp_path / "run" / "eval" / "summary.md").read_text() == comparison_table(out["summary"], 4)
