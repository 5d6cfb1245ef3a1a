"""Rewards: answer extraction, the R1-Zero format check, and math-verify in a pool that never hangs."""

import re

import pytest

from r1.rewards import VerifierPool, build_reward, extract_answer, format_reward


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think> a </think> <answer> 42 </answer>", 1.0),
        ("<think>\nmulti\nline\n</think>\n<answer>\\boxed{7}</answer>\n", 1.0),
        ("<think></think><answer>x</answer>", 1.0),
        ("<answer> 42 </answer>", 0.0),  # missing think
        ("<think> a </think> 42", 0.0),  # missing answer
        ("<think> a <answer> 42 </answer>", 0.0),  # unclosed think
        ("<think> a </think> <answer> 42", 0.0),  # unclosed answer
        ("<think> a </think> <answer> 42 </answer> trailing", 0.0),  # extra text
        ("preamble <think> a </think> <answer> 42 </answer>", 0.0),
        ("<think> a <think> b </think> </think> <answer> 1 </answer>", 0.0),  # nested
        ("<think> a </think> <answer> 1 </answer> <answer> 2 </answer>", 0.0),  # repeated
        ("<answer> 1 </answer> <think> a </think>", 0.0),  # wrong order
        ("<think> a </think> <answer>   </answer>", 0.0),  # empty answer
    ],
)
def test_format_reward(response, expected):
    assert format_reward(response) == expected


def test_extract_answer_takes_the_last_answer():
    assert extract_answer("<answer> 1 </answer> then <answer> \\boxed{2} </answer>") == "\\boxed{2}"
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>  </answer>") is None


@pytest.fixture(scope="module")
def pool():
    p = VerifierPool(num_workers=1, timeout_s=3.0)
    yield p
    p.close()


# (reference, answer inside <answer>...</answer>, expected accuracy reward). References are MATH-style LaTeX without
# delimiters; answers come with and without \\boxed{} / $...$, malformed and adversarial.
ACCURACY_CASES = [
    # MATH-style references that the plain-number fallback used to misread (5\sqrt{3} -> 5, 3\pi -> 3)
    ("5\\sqrt{3}", "5\\sqrt{3}", 1.0),
    ("5\\sqrt{3}", "\\boxed{5\\sqrt{3}}", 1.0),
    ("5\\sqrt{3}", "$5\\sqrt 3$", 1.0),
    ("5\\sqrt{3}", "\\sqrt{75}", 1.0),
    ("5\\sqrt{3}", "5", 0.0),
    ("5\\sqrt{3}", "\\boxed{5}", 0.0),
    ("3\\pi", "3\\pi", 1.0),
    ("3\\pi", "3", 0.0),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", 1.0),
    ("\\dfrac{1}{2}", "0.5", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac{1}{2}", "1/2", 1.0),
    ("(-\\infty, 3]", "(-\\infty,3]", 1.0),
    ("(-\\infty, 3]", "(-\\infty, 3)", 0.0),
    ("10\\%", "10\\%", 1.0),
    ("\\$18.90", "18.90", 1.0),
    ("1000", "1,000", 1.0),
    ("10000", "10,\\!000", 1.0),
    ("\\text{(B)}", "(B)", 1.0),
    ("2^{10}", "1024", 1.0),
    ("x^2+1", "1+x^2", 1.0),
    ("42", "42.", 1.0),
    ("42", "The answer is \\boxed{42}.", 1.0),
    # malformed answers: a prefix that parses is not the answer
    ("12", "12-", 0.0),
    ("7", "7*", 0.0),
    ("5", "5\\sqrt{", 0.0),
    ("12", "\\boxed{12-}", 0.0),
    ("12", "", 0.0),
    # adversarial: several answers, numbers that LaTeX would add up, prose without math
    ("3", "1 2", 0.0),
    ("5", "5 or 6", 0.0),
    ("5", "\\boxed{6}\\boxed{5}", 0.0),
    ("5", "5, 6", 0.0),
    ("5", "The answer is 5", 0.0),
]


@pytest.mark.parametrize("reference, answer, expected", ACCURACY_CASES)
def test_accuracy_reward_reads_whole_answers(reward, reference, answer, expected):
    """Through the rollout path: extract from the R1-Zero layout, then math-verify in the pool."""
    response = f"<think> work </think> <answer> {answer} </answer>"
    assert reward.score([response], [reference]).components["accuracy"] == [expected]


@pytest.fixture(scope="module")
def reward():
    r = build_reward([("accuracy", 1.0)], verify_timeout_s=5)
    yield r
    r.verifier.close()


def test_hanging_verification_times_out_to_zero(pool):
    """sympy takes ~30 s on this pair; the pool kills the check after its timeout, counts it, and moves on. (The
    count is the evidence: pebble raises the timeout only when it cancelled the check at its deadline; a check
    that ran to its end would be an equivalence result, not a timeout.)"""
    before = pool.stats.timeouts
    out = pool.equivalent_many([("(x+1)^{3000}", "(x+2)^{3000}"), ("2", "2")])
    assert out == [False, True]
    assert pool.stats.timeouts == before + 1
    assert pool.equivalent_many([("1/2", "0.5")]) == [True]  # the pool goes on after the kill


def test_rule_reward_sums_weighted_terms():
    reward = build_reward([("accuracy", 1.0), ("format", 0.5)], verify_timeout_s=5)
    try:
        res = reward.score(
            ["<think> t </think> <answer> \\frac{1}{2} </answer>", "<answer> 0.5 </answer>", "no answer"],
            ["0.5", "0.5", "0.5"],
        )
    finally:
        reward.verifier.close()
    assert res.components == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 0.0]}
    assert res.total == [1.5, 1.0, 0.0]
    assert res.answers == ["\\frac{1}{2}", "0.5", None]


def length_bonus(response: str, reference: str) -> float:
    return min(len(response), 10) / 10


def test_user_reward_terms_plug_in_by_import_path():
    reward = build_reward([("tests.test_rewards:length_bonus", 2.0)])
    try:
        assert reward.score(["12345"], ["x"]).total == [1.0]
    finally:
        reward.verifier.close()


def test_unknown_reward_term_is_a_clear_error():
    with pytest.raises(ValueError, match="package.module:function"):
        build_reward([("acuracy", 1.0)])


# --- answer extractors (reward.answer_extractor) ----------------------------------------------------------------
@pytest.mark.parametrize("response, expected", [
    ("so x = \\boxed{42}.", "42"),
    ("\\boxed{1} first, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last one, nested braces whole
    ("\\boxed{\\sqrt{x^{2}}} and \\boxed{3", "\\sqrt{x^{2}}"),  # a cut-off last box: the one before it
    ("\\boxed{ }", None),
    ("no box, <answer> 4 </answer>", None),
])
def test_boxed_extractor_takes_the_last_closed_box(response, expected):
    from r1.rewards.extract import make_extractor

    assert make_extractor("boxed")(response) == expected


def test_final_line_extractor_reads_the_last_matching_line():
    from r1.rewards.extract import make_extractor

    gsm8k = make_extractor("final_line")
    assert gsm8k("Natalia sold 48 clips.\n#### 72\n") == "72"
    assert gsm8k("#### 1\nthen more thought\n####  2 \n\n") == "2"
    assert gsm8k("the answer is 72") is None
    custom = make_extractor("final_line", r"[Tt]he answer is\s*(\S+?)\.?$")
    assert custom("work...\nThe answer is 17.\nThanks") == "17"
    with pytest.raises(ValueError, match="needs a group"):
        make_extractor("final_line", r"####.*")


def test_the_boxed_extractor_feeds_math_verify():
    """Accuracy of boxed answers, decided by the real math-verify (1/2 = 0.5; 3 != 4; no box = wrong)."""
    reward = build_reward([("accuracy", 1.0)], verify_timeout_s=5, answer_extractor="boxed")
    try:
        out = reward.score(["half: \\boxed{\\frac{1}{2}}", "\\boxed{3}", "<answer> 4 </answer>"], ["0.5", "4", "4"])
    finally:
        reward.verifier.close()
    assert out.total == [1.0, 0.0, 0.0] and out.answers == ["\\frac{1}{2}", "3", None]


@pytest.mark.parametrize("override, message", [
    ("reward.answer_extractor=boxd", ("reward.answer_extractor='boxd': choose one of ['answer_tags', 'boxed', "
                                     "'final_line']")),
    ("data.template=chatml", "data.template='chatml': choose one of ['r1_zero', 'plain', 'chat']"),
    ("reward.sandbox.disk_mb=0", ("reward.sandbox: cpu_s, wall_s, memory_mb, output_kb, processes, disk_mb and "
                                  "parallel must be > 0")),
])
def test_an_unknown_extractor_or_template_names_the_choices(override, message):
    from r1.config.validate import ConfigError, validate
    from tests.conftest import TINY, compose

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose([*TINY, "run_dir=x", override]))
    with pytest.raises(ConfigError, match="needs a group around the answer"):
        validate(compose([*TINY, "run_dir=x", "reward.answer_extractor=final_line",
                          "reward.final_line_pattern='####.*'"]))


# --- language consistency (reward term "language") --------------------------------------------------------------
@pytest.mark.parametrize("response, zh, en", [
    # 7 Han characters, 3 English words (counted by hand)
    ("<think>我们先计算 the sum 然后 check</think><answer>7</answer>", 7, 3),
    # math is no language: $...$, \(...\), LaTeX commands, digits, single-letter variables
    ("<think>计算 $\\frac{a}{b}$ 等于 0.5, \\(x^2\\) so x = \\sqrt{4}</think><answer>2</answer>", 4, 1),
    ("<think>Let's add: 3 + 4 = 7. 所以答案是七。</think><answer>7</answer>", 6, 2),
    ("no think tags, so everything before the answer counts <answer>x</answer>", 0, 9),
])
def test_words_are_counted_per_language(response, zh, en):
    from r1.rewards.language import chain_of_thought, language_consistency, words_by_language

    counts = words_by_language(chain_of_thought(response))
    assert (counts["zh"], counts["en"]) == (zh, en)
    assert language_consistency(response, "zh") == pytest.approx(zh / (zh + en))
    assert language_consistency(response, "en") == pytest.approx(en / (zh + en))


def test_language_consistency_of_other_scripts_and_of_no_words():
    from r1.rewards.language import language_consistency

    assert language_consistency("<think>Привет world</think>", "en") == 0.5  # Cyrillic: a word of neither
    assert language_consistency("<think>12 + 3 = 15</think><answer>15</answer>", "zh") == 1.0  # nothing mixed
    with pytest.raises(ValueError, match=r"reward.language='fr': choose one of \['en', 'zh'\]"):
        language_consistency("x", "fr")


def test_the_r1_reasoning_reward_sums_accuracy_format_and_language():
    """conf/reward/r1_reasoning.yaml as the rollout worker builds it: every term, weighted, on mixed zh/en samples."""
    from tests.conftest import TINY, compose

    cfg = compose([*TINY, "run_dir=x", "reward=r1_reasoning", "reward.language=zh"])
    reward = build_reward([(t.name, t.weight) for t in cfg.reward.terms], verify_timeout_s=5,
                          language=cfg.reward.language)
    try:
        out = reward.score(["<think>三加四 is seven</think> <answer>7</answer>",  # right, formatted, 3 zh of 5
                            "<think>三加四</think> <answer>8</answer>"], ["7", "7"])  # wrong, formatted, all zh
    finally:
        reward.verifier.close()
    assert out.components == {"accuracy": [1.0, 0.0], "format": [1.0, 1.0], "language": [0.6, 1.0]}
    assert out.total == pytest.approx([2.6, 2.0])
