import json

import pytest

from r1.data.arithmetic import all_problems, careful_solution, pretraining_corpus, write_prompt_files
from r1.data.prompts import PromptSampler, load_prompts
from r1.data.template import R1_ZERO_TEMPLATE, apply_template
from r1.rewards import extract_answer, format_reward


def test_r1_zero_template_is_verbatim():
    assert R1_ZERO_TEMPLATE.startswith("A conversation between User and Assistant. The user asks a question")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in R1_ZERO_TEMPLATE
    assert apply_template("Compute 1 + 2").endswith("User: Compute 1 + 2. Assistant:")


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        json.dumps({"prompt": "ok", "answer": 3}),
        "{not json",
        json.dumps({"prompt": "", "answer": "1"}),
        json.dumps({"prompt": "no answer"}),
        json.dumps({"prompt": "list answer", "answer": [1]}),
        json.dumps({"prompt": "fine", "answer": "\\frac12"}),
    ]
    path.write_text("\n".join(rows) + "\n")
    loaded = load_prompts(path)
    assert [p.prompt for p in loaded.problems] == ["ok", "fine"]
    assert loaded.problems[0].answer == "3"
    assert loaded.skipped == 4


def test_parquet_with_custom_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["q1", None], "solution": ["1", "2"]}), path)
    loaded = load_prompts(path, prompt_field="question", answer_field="solution")
    assert len(loaded.problems) == 1 and loaded.skipped == 1


def test_missing_file_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train_path"):
        load_prompts(tmp_path / "nope.jsonl")


def test_sampler_resumes_exactly():
    a = PromptSampler(10, seed=3)
    first = a.next_indices(7)
    state = a.state_dict()
    rest = a.next_indices(9)  # crosses an epoch boundary
    b = PromptSampler(10, seed=3)
    b.load_state_dict(state)
    assert b.next_indices(9) == rest
    assert sorted(first + rest[:3]) == list(range(10))  # an epoch is a permutation


def test_arithmetic_splits_are_disjoint_and_solutions_score(tmp_path):
    train = set(all_problems(4, 0, 9, held_out=False))
    held = set(all_problems(4, 0, 9, held_out=True))
    assert not train & held and len(held) >= 200
    sol = careful_solution((3, 5, 7, 2))
    assert format_reward(sol) == 1.0 and extract_answer(sol) == "17"
    _, eval_path = write_prompt_files(tmp_path, num_operands=4, low=0, high=9)
    assert len(load_prompts(eval_path).problems) == len(held)
    docs = pretraining_corpus(50, num_operands=4, low=0, high=9, mix={"careful": 1, "careless": 0, "malformed": 0},
                              seed=0)
    assert all(d.startswith(R1_ZERO_TEMPLATE[:40]) for d in docs)


@pytest.mark.parametrize("model", ["tiny_model", "tiny_llama"])
def test_the_loaded_tokenizer_encodes_as_the_tiny_model_was_pretrained(model, request):
    """transformers 5 rebuilds a qwen2 checkpoint's tokenizer from its own code (Qwen2's regex: a digit's leading
    space becomes a token of its own); r1 must encode exactly as the tokenizer.json the model was trained with, here
    read by the `tokenizers` library itself."""
    from tokenizers import Tokenizer

    from r1.data.tokens import TokenRules

    path = request.getfixturevalue(model)
    rules = TokenRules.load(path)
    written = Tokenizer.from_file(f"{path}/tokenizer.json")
    for doc in pretraining_corpus(20, num_operands=4, low=0, high=9, seed=5,
                                  mix={"careful": 0.4, "careless": 0.4, "malformed": 0.2}):
        expected = written.encode(doc, add_special_tokens=rules.bos_id is not None).ids
        assert rules.encode(doc) == expected
        assert rules.tokenizer.decode(expected, skip_special_tokens=True).strip() == doc.strip()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_chat_template_is_the_tokenizers_own(tiny_model, tmp_path):
    """data.template=chat: one user turn and the generation prompt, as the tokenizer's template writes them; the
    ids the rollout worker encodes equal the tokenizer's own apply_chat_template ids."""
    from r1.data.tokens import TokenRules, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(tmp_path)  # (what a chat model's checkpoint carries)
    chat = TokenRules(load_tokenizer(str(tmp_path)))
    text = apply_template("What is 1 + 1?", "chat", chat.tokenizer)
    assert text == "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    assert chat.encode(text) == list(chat.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 1?"}], add_generation_prompt=True, tokenize=True,
        return_dict=False))


def test_a_tokenizer_without_a_chat_template_is_refused_before_anything_starts(tiny_model, tmp_path):
    from r1.config.validate import ConfigError
    from r1.inputs import prepare_model
    from tests.conftest import TINY, compose

    with pytest.raises(ConfigError, match="data.template=chat: the tiny model .* is a base model without a chat"):
        prepare_model(compose([*TINY, "run_dir=unused", "data.template=chat"]))
    with pytest.raises(ConfigError, match=f"data.template=chat: the tokenizer of '{tiny_model}' has no chat template"):
        prepare_model(compose([*TINY, "run_dir=unused", "data.template=chat", "model.source=pretrained",
                               f"model.path={tiny_model}"]))
