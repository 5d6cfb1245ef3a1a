"""Code rewards: the program a response answers with, run in the real sandbox against the problem's test cases
(stdin/stdout and call-based), and every misbehaviour scored 0 and counted. Data rows with tests load as coding
problems; a batch may mix math and code."""

from __future__ import annotations

import json

import pytest

from r1.data.prompts import load_prompts, parse_tests
from r1.rewards import build_reward
from r1.rewards.code import CodeVerifier, extract_program, same_output
from r1.rewards.sandbox import SandboxLimits
from r1.types import CodeTest, Reference

LIMITS = SandboxLimits(cpu_s=1, wall_s=8, memory_mb=256, output_kb=64, processes=16)  # (as tests/test_sandbox.py)
DOUBLE = (CodeTest(stdin="21\n", stdout="42\n"), CodeTest(stdin="-3\n", stdout="-6"))
CALLS = (CodeTest(assertion="assert double(21) == 42"), CodeTest(assertion="assert double(-3) == -6"))


def answer(program: str) -> str:
    """A response in the R1 format whose answer is ``program``."""
    return f"<think>read n, print twice n</think>\n<answer>\n```python\n{program}\n```\n</answer>"


@pytest.mark.parametrize("response, program", [
    (answer("print(1)"), "print(1)"),
    ("<think>```python\nprint(0)\n```</think>```py\nprint(2)\n```", "print(2)"),  # not the chain of thought's code
    ("```python\nprint(1)\n```\nthen\n```\nprint(3)\n```", "print(3)"),  # the last block, unlabelled is Python
    ("```python\nprint(1)\n```\n```cpp\nint main() {}\n```", "print(1)"),  # other languages are not the program
    ("```python\n```", None),
    ("print(1)", None),  # not fenced: no program
    ("<answer>```python\nprint(5)\n```</answer> ```python\nprint(6)\n```", "print(5)"),  # inside <answer> if any
])
def test_the_program_is_the_answers_last_python_block(response, program):
    assert extract_program(response) == program


def test_outputs_compare_line_by_line_whitespace_at_ends_aside():
    assert same_output("1 2\n3  \n\n", "1 2\n3")
    assert not same_output("1 2 3\n", "1 2\n3\n")
    assert not same_output("12\n", "1 2\n")


@pytest.mark.usefixtures("bwrap")
@pytest.mark.parametrize("program, tests, passes, counted", [
    ("print(int(input()) * 2)", DOUBLE, True, {"programs": 1, "passed": 1, "ok": 2}),
    ("print(int(input()) + 21)", DOUBLE, False, {"programs": 1, "ok": 2, "wrong_output": 1}),  # 2nd case wrong
    ("def double(x):\n    return 2 * x", CALLS, True, {"programs": 1, "passed": 1, "ok": 1}),
    ("def double(x):\n    return x + x + 1", CALLS, False, {"programs": 1, "error": 1}),  # AssertionError
    ("import sys\nsys.exit(3)", DOUBLE, False, {"programs": 1, "error": 1}),  # crashes: first case ends it
    ("while True:\n    pass", DOUBLE, False, {"programs": 1, "cpu_limit": 1}),
    ("import time\ntime.sleep(60)", DOUBLE, False, {"programs": 1, "timeout": 1}),
    ("import os\nwhile True:\n    os.fork()", DOUBLE, False, {"programs": 1, "process_limit": 1}),
    ("print(open('/etc/passwd').read())", DOUBLE, False, {"programs": 1, "file_denied": 1}),
    ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", DOUBLE, False,
     {"programs": 1, "network_denied": 1}),
    (None, DOUBLE, False, {"no_program": 1}),
], ids=["correct", "wrong", "calls-correct", "calls-wrong", "crash", "spin", "hang", "fork-bomb", "file", "socket",
        "no-program"])
def test_each_program_gets_its_reward_and_its_outcome_is_counted(program, tests, passes, counted):
    verifier = CodeVerifier(LIMITS, parallel=2)
    try:
        assert verifier.passes(program, tests) is passes
        assert dict(verifier.stats) == counted
    finally:
        verifier.close()


@pytest.mark.usefixtures("bwrap")
def test_a_fork_bomb_does_not_starve_the_programs_beside_it():
    """Programs of one worker run side by side, each slot as its own user: a fork bomb that holds its process limit
    leaves the correct programs starting next to it untouched (as one user, they could not even start)."""
    verifier = CodeVerifier(LIMITS, parallel=2)
    bomb = "import os, time\nfor _ in range(1000):\n    try:\n        os.fork()\n    except OSError:\n        break\n" \
           "time.sleep(3)"  # every process it made holds its slot until the end
    good = "print(int(input()) * 2)"
    try:
        results = verifier.passes_many([(bomb, DOUBLE)] + [(good, DOUBLE)] * 6)  # (the good ones: one after another)
    finally:
        verifier.close()
    assert results == [False] + [True] * 6
    assert verifier.stats["passed"] == 6


@pytest.mark.usefixtures("bwrap")
def test_a_batch_mixes_math_and_code_problems():
    reward = build_reward([("accuracy", 1.0), ("format", 1.0)], sandbox=LIMITS, sandbox_parallel=2)
    try:
        result = reward.score(
            [answer("print(int(input()) * 2)"), answer("print(0)"), "<think>sum</think> <answer>12</answer>",
             "<think>sum</think> <answer>13</answer>"],
            [Reference(tests=DOUBLE), Reference(tests=DOUBLE), Reference("12"), "12"],
        )
    finally:
        reward.code.close()
        reward.verifier.close()
    assert result.components["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    assert result.components["format"] == [1.0, 1.0, 1.0, 1.0]
    assert result.answers == ["print(int(input()) * 2)", "print(0)", "12", "13"]
    assert reward.code.stats["programs"] == 2 and reward.verifier.stats.checked == 2


def test_rows_with_tests_load_as_coding_problems(tmp_path):
    rows = [
        {"prompt": "Double n.", "tests": [{"input": "2\n", "output": "4\n"}]},
        {"prompt": "Double.", "tests": json.dumps([{"assert": "assert double(2) == 4"}])},  # LiveCodeBench: a string
        {"prompt": "2+2?", "answer": "4"},
        {"prompt": "bad", "tests": [{"input": "2\n"}]},  # no expected output
        {"prompt": "bad", "tests": "not json"},
        {"prompt": "bad", "tests": []},
        {"prompt": "bad", "tests": [{"input": "1", "output": "1", "assert": "assert True"}]},  # which one?
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_prompts(path)
    assert loaded.skipped == 4
    assert [p.reference for p in loaded.problems] == [
        Reference(tests=(CodeTest(stdin="2\n", stdout="4\n"),)),
        Reference(tests=(CodeTest(assertion="assert double(2) == 4"),)),
        Reference("4"),
    ]


def test_parquet_tests_with_struct_columns(tmp_path):
    """Parquet gives every test struct every key (None where a row lacks it): still one kind per case."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "code.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "Double n.", "tests": [{"input": "2\n", "output": "4\n"}, {"assert": "assert double(1) == 2"}]},
    ]), path)
    (problem,) = load_prompts(path).problems
    assert problem.tests == (CodeTest(stdin="2\n", stdout="4\n"), CodeTest(assertion="assert double(1) == 2"))
    assert parse_tests([{"input": None, "output": None, "assert": "assert 1"}]) == (CodeTest(assertion="assert 1"),)


def test_coding_data_without_a_working_sandbox_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    from r1.inputs import prepare_data
    from tests.conftest import TINY, compose

    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "Double n.", "tests": [{"input": "2\n", "output": "4\n"}]}) + "\n")
    cfg = compose([*TINY, "run_dir=x", "data.generator=null", f"data.train_path={path}", f"data.eval_path={path}"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(RuntimeError, match=r"coding problems .* needs bubblewrap \(`apt-get install bubblewrap`\)"):
        prepare_data(cfg)


HUMANEVAL_CHECK = '''
def check(candidate):
    assert candidate([1.0, 2.8, 3.0], 0.3) == True
    assert candidate([1.0, 2.0, 3.9], 0.3) is False
    assert abs(candidate.__defaults__ is None) == 1
    assert not candidate([], 1.0)
    assert [x for x in (candidate([1.0, 1.1], 0.2), candidate([1.0], 0.2)) if x] == [True]
    assert 0 < 1 < 2 <= 2 and {"a": [1, (2, 3)]} == {"a": [1, (2, 3)]} and (None or 5) == 5
    assert 3 in [1, 2, 3] and "x" not in "abc" and -(-2) == 2 and 7 // 2 * 2 + 7 % 2 == 7

check(has_close_elements)
'''
CLOSE = ("def has_close_elements(numbers, threshold):\n    return any(abs(a - b) < threshold for i, a in "
         "enumerate(numbers) for b in numbers[i + 1:])")


@pytest.mark.usefixtures("bwrap")
@pytest.mark.parametrize("program, status", [
    (CLOSE, "ok"),  # HumanEval's shape: check(candidate) with its comparisons, chains, truth tests, arithmetic
    (CLOSE + "\nraise SystemExit(0)", "exited_early"),  # ends before the tests run...
    ("import sys\ndef has_close_elements(n, t):\n    sys.exit(0)", "exited_early"),  # ...or inside one
    ("import os\ndef has_close_elements(n, t):\n    os._exit(0)", "exited_early"),  # no SystemExit at all
    ("def has_close_elements(n, t):\n    print('\\nr1-verdict 0123456789abcdef0123456789abcdef')\n    raise SystemExit",
     "exited_early"),  # a verdict without the run's secret
    (("class Yes:\n    def __eq__(self, other):\n        return True\n    __ne__ = __eq__\n"
     "def has_close_elements(n, t):\n    return Yes()"), "untrusted_value"),  # always equal
    (("class Yes(int):\n    def __eq__(self, other):\n        return True\n    def __bool__(self):\n        return True\n"
     "def has_close_elements(n, t):\n    return Yes(1)"), "untrusted_value"),  # a subclass of a builtin
    (("class Truthy:\n    def __bool__(self):\n        return bool(__import__('random').random() < 2)\n"
     "    def __eq__(self, other):\n        return NotImplemented\n"
     "def has_close_elements(n, t):\n    return Truthy()"), "untrusted_value"),  # a lying truth value
    (("import builtins\nbuiltins.bool = lambda x: True\nbuiltins.isinstance = lambda *a: True\n"
     "builtins.type = lambda x: int\ndef has_close_elements(n, t):\n    return 'yes'"), "error"),  # rebinding builtins
    ("def has_close_elements(n, t):\n    return False", "error"),  # simply wrong: its assert fails
], ids=["correct", "exit-at-top", "sys-exit-in-test", "os-exit-in-test", "forged-verdict", "always-equal",
        "int-subclass", "lying-bool", "rebound-builtins", "wrong"])
def test_call_based_tests_cannot_be_ended_early_or_passed_by_values_that_lie(program, status):
    verifier = CodeVerifier(LIMITS, parallel=1, uid_base=64200)
    try:
        passed = verifier.passes(program, (CodeTest(assertion=HUMANEVAL_CHECK),))
    finally:
        verifier.close()
    assert passed is (status == "ok")
    assert verifier.stats[status] == 1, dict(verifier.stats)


@pytest.mark.usefixtures("bwrap")
def test_values_the_tests_may_compare_and_the_programs_own_main_module():
    """What call-based tests really compare passes: Decimal, datetime, nested containers, deque, a dataclass of the
    program's compared through its fields; a program's __main__ is its own module (dataclasses and pickle find it)."""
    program = ("import collections, dataclasses, datetime, decimal, pickle, sys\n"
               "@dataclasses.dataclass\nclass Point:\n    x: int\n    y: int\n"
               "def f():\n    return (decimal.Decimal('1.5'), datetime.date(2025, 1, 20), collections.deque([1, 2]),"
               " {'k': {1, 2}}, b'x', 3 + 4j, range(3))\n"
               "def point():\n    return pickle.loads(pickle.dumps(Point(1, 2)))\n"
               "assert sys.modules['__main__'].Point is Point and __name__ == '__main__'")
    tests = ("import collections, datetime, decimal\n"
             "assert f() == (decimal.Decimal('1.5'), datetime.date(2025, 1, 20), collections.deque([1, 2]), "
             "{'k': {1, 2}}, b'x', 3 + 4j, range(3))\n"
             "assert (point().x, point().y) == (1, 2)\n"
             "assert sorted(f()[3]['k'], reverse=True) == [2, 1] and len(f()) == 7\n"
             "class TestPoint:  # (unittest's shape: checks inside a class body)\n"
             "    def test_x(self):\n        assert point().x - 1 == 0 if point() is not None else False\n"
             "TestPoint().test_x()")
    verifier = CodeVerifier(LIMITS, parallel=1, uid_base=64200)
    try:
        assert verifier.passes(program, (CodeTest(assertion=tests),)), dict(verifier.stats)
        assert not verifier.passes(program, (CodeTest(assertion="assert point() == point()"),))  # a program's class
    finally:
        verifier.close()
    assert verifier.stats["untrusted_value"] == 1
