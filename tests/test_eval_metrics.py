from r1.eval.metrics import majority_answer, summarize_problem


def test_majority_vote_groups_equivalent_answers():
    eq = {frozenset({"1/2", "0.5"})}

    def equivalent(a, b):
        return a == b or frozenset({a, b}) in eq

    assert majority_answer(["3", "1/2", "0.5", None, None, None], equivalent) == "1/2"
    assert majority_answer([None, None], equivalent) is None
    assert majority_answer(["a", "b"], equivalent) == "a"  # ties go to the first seen


def test_summarize_problem_pass1_cons_format():
    s = summarize_problem([True, False, False, True], [1, 1, 0, 1], ["2", "3", "3", "2"], lambda a, b: a == b)
    assert s.pass1 == 0.5 and s.cons_correct and s.format_rate == 0.75
    s = summarize_problem([True, False, False], [1, 1, 1], ["2", "3", "3"], lambda a, b: a == b)
    assert s.pass1 == 1 / 3 and not s.cons_correct
