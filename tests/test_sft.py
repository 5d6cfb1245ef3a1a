"""The SFT stage (cold start, SFT, distillation) against references: the loss against a hand-computed NLL, sequence
packing against the model's own forward of every row, tokenization against the rollouts' encoding and a chat
template's rendering, batch shares against their counts, and real runs on the training pool against a plain HF
forward of the data (the likelihood rises) and against an uninterrupted run (resume is exact)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1.algo import SFTLoss
from r1.data.sft import SFTExample, SFTMixture, SFTSet, collate_examples, load_sft_set, shares
from r1.data.template import apply_template
from r1.data.tokens import TokenRules
from r1.engines.hf_train import HFTrainEngine
from r1.sft import run
from tests.conftest import TINY, compose

SOURCE = compose([*TINY, "run_dir=x", "+experiment=r1_cold_start"]).sft.datasets[0]  # (the schema's field names)


def _engine(model_path, **kw):
    args = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 1.0,
            "micro_batch_size": 4, "with_reference": False}
    return HFTrainEngine(model_path, **{**args, **kw})


def _examples(n: int, seed: int = 0) -> list[SFTExample]:
    g = torch.Generator().manual_seed(seed)
    return [SFTExample(torch.randint(3, 300, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist(),
                       torch.randint(3, 300, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n)]


def test_the_sft_loss_is_the_mean_nll_of_the_response_tokens():
    logp = torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, -9.0, -0.5, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    batch = collate_examples([SFTExample([1], [2, 3]), SFTExample([1, 2], [3])], pad_id=0)
    batch.response_mask = mask
    loss, stats = SFTLoss()(logp, batch, None)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 0.5) / 3) and stats["nll"] == pytest.approx(3.5 / 3)
    assert SFTLoss().units(batch) == 3


def test_sequence_packing_gives_every_rows_logprobs_and_the_same_update(tiny_model):
    """Rows packed end to end (block-diagonal mask, positions restarting): the log-probs equal the model's forward of
    each row alone, and an update on packed micro-batches has the loss and gradients of the padded one."""
    from r1.engines.sequence_packing import pack_sequences

    batch = collate_examples(_examples(7), pad_id=0)
    packed = pack_sequences(batch)
    assert packed.input_ids.shape == (1, int(batch.attention_mask.sum()))  # no padding at all
    engine = _engine(tiny_model, micro_batch_tokens=40)
    logp, _ = engine._response_logprobs(engine.model, batch, 1.0)
    for row in range(len(batch)):
        n = int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row: row + 1, :n]
        alone = torch.log_softmax(engine.model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        cols = batch.response_mask[row, 1:n].bool()
        assert torch.allclose(logp[row, 1:n][cols], alone[cols].detach(), atol=2e-5, rtol=0)
    planned = engine.compute_logprobs(batch, temperature=1.0)  # (packed by its token plan: other micro-batches)
    assert torch.allclose(planned * batch.response_mask, logp.detach() * batch.response_mask, atol=2e-5, rtol=0)

    packed_engine, padded_engine = _engine(tiny_model, micro_batch_tokens=40), _engine(tiny_model, micro_batch_size=2)
    a = packed_engine.train_step(batch.select(slice(None)), SFTLoss())
    b = padded_engine.train_step(batch.select(slice(None)), SFTLoss())
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for (name, x), (_, y) in zip(packed_engine.model.named_parameters(), padded_engine.model.named_parameters()):
        assert torch.allclose(x.grad, y.grad, atol=1e-6, rtol=1e-4), name  # (Adam would amplify float noise)


def test_rows_are_tokenized_as_rollouts_see_them_and_end_as_generation_ends(tiny_model, tmp_path):
    tokens = TokenRules.load(tiny_model)
    rows = [
        {"prompt": "Compute 1 + 2", "response": " <think> 1 + 2 = 3 </think> <answer> 3 </answer>"},
        {"messages": [{"role": "user", "content": "Compute 2 + 2"}, {"role": "assistant", "content": " 4"}]},
        {"prompt": "no response"},
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},  # multi-turn
        {"prompt": "Compute " + " + ".join(["1"] * 100), "response": " 100"},  # too long
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    loaded = load_sft_set(SOURCE, str(path), "r1_zero", tokens, max_tokens=120)
    assert dict(loaded.skipped) == {"invalid_json": 1, "no_prompt_or_response": 1, "malformed_messages": 1,
                                    "multi_turn_needs_chat_template": 1, "longer_than_max_tokens": 1}
    first, second = loaded.examples
    assert first.prompt_ids == tokens.encode(apply_template("Compute 1 + 2", "r1_zero"))
    assert first.response_ids == tokens.tokenizer(rows[0]["response"], add_special_tokens=False)["input_ids"] + \
        [tokens.eos_id]
    assert second.prompt_ids == tokens.encode(apply_template("Compute 2 + 2", "r1_zero"))


CHAT = ("{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_chat_template_renders_the_prompt_and_keeps_the_last_turns_reasoning(tiny_model):
    """The prompt is the template's rendering up to its generation prompt; the response is the assistant's text as
    written, then the template's end of turn. (This template, like DeepSeek-R1-Distill's, strips reasoning from
    assistant turns: earlier turns lose it, the trained turn keeps it.)"""
    from r1.data.sft import tokenize_conversation

    tokens = TokenRules.load(tiny_model)
    tokens.tokenizer.chat_template = CHAT
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>y</think>d"}]
    example = tokenize_conversation(turns, "chat", tokens)
    decode = tokens.tokenizer.decode
    assert decode(example.prompt_ids) == "<|user|>a<|end|><|assistant|>b<|end|><|user|>c<|end|><|assistant|>"
    assert decode(example.response_ids) == "<think>y</think>d<|end|>"


def test_batches_take_each_set_by_its_weight_and_resume_where_they_were():
    assert shares([3, 1], 8) == [6, 2] and shares([1, 1, 1], 8) == [3, 3, 2] and sum(shares([0.7, 0.3], 5)) == 5
    a = SFTSet("a.jsonl", [SFTExample([1], [i]) for i in range(10)])
    b = SFTSet("b.jsonl", [SFTExample([2], [i]) for i in range(3)])
    mixture = SFTMixture([a, b], [0.75, 0.25], seed=0)
    batches = [mixture.next_batch(8) for _ in range(3)]
    for batch in batches:
        assert [e.prompt_ids[0] for e in batch] == [1] * 6 + [2] * 2
    seen_b = [e.response_ids[0] for batch in batches for e in batch if e.prompt_ids == [2]]
    assert sorted(seen_b[:3]) == [0, 1, 2] and sorted(seen_b[3:6]) == [0, 1, 2]  # epochs of b: each row once
    again = SFTMixture([a, b], [0.75, 0.25], seed=0)
    again.next_batch(8)
    state = again.state_dict()
    resumed = SFTMixture([a, b], [0.75, 0.25], seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.next_batch(8) == batches[1] and resumed.next_batch(8) == batches[2]


# --- runs on the training pool ------------------------------------------------------------------------------------
def _cfg(cache_dir, run_dir, total_steps, resume=False):
    return compose([*TINY, "+experiment=r1_cold_start", "logger=none", f"cache_dir={cache_dir}",
                    f"run_dir={run_dir}", f"trainer.total_steps={total_steps}", f"resume={str(resume).lower()}",
                    "sft.batch_size=16", "sft.datasets=[{generator: arithmetic_long_cot, size: 200}]",
                    "checkpoint.every_steps=1", "checkpoint.keep_last=5", "trainer.lr=1e-3", "trainer.warmup_steps=0"])


def _nll(model_path, examples) -> float:
    """Mean NLL per response token under a plain HF forward (the reference, outside r1's engines)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.response_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            total -= float(logp[len(e.prompt_ids) - 1:].sum())
            count += len(e.response_ids)
    return total / count


@pytest.mark.slow
def test_cold_start_raises_the_likelihood_of_its_data_and_resumes_exactly(ray_local, tiny_model, cache_dir, tmp_path):
    straight = tmp_path / "straight"
    out = run(_cfg(cache_dir, straight, total_steps=4))
    assert out["step"] == 4
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["sft/response_tokens"] > 0 and math.isfinite(m["train/nll"]) for m in metrics)

    cfg = _cfg(cache_dir, straight, 4)
    from r1.inputs import sft_paths

    data = load_sft_set(cfg.sft.datasets[0], sft_paths(cfg)[0], "r1_zero", TokenRules.load(tiny_model), 256)
    held = data.examples[:24]
    before, after = _nll(tiny_model, held), _nll(out["policy"], held)
    assert after < before - 0.2, (before, after)  # the data's responses became likelier (a fresh HF forward says so)

    resumed = tmp_path / "resumed"
    run(_cfg(cache_dir, resumed, total_steps=2))
    state = json.loads((resumed / "checkpoints" / "step_000002" / "driver_state.json").read_text())
    assert state["step"] == 2 and state["data"]["samplers"][0]["index"] == 2 * 16
    run(_cfg(cache_dir, resumed, total_steps=4, resume=True))
    a = load_file(str(straight / "checkpoints" / "step_000004" / "policy" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_000004" / "policy" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_distillation_trains_a_student_with_its_own_tokenizer_in_its_own_chat_format(ray_local, tiny_model, cache_dir,
                                                                                     tmp_path):
    """+experiment=r1_distill: the student (model=tiny_student: its own, smaller vocabulary and a chat template)
    reads the teacher's rows in its chat format, and its checkpoint keeps that tokenizer and template."""
    from r1.data.sft import tokenize_conversation

    rows = tmp_path / "teacher.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Compute {a} + {b}", "response": f" <think> {a} + {b} = {a + b} "
                                        f"</think> <answer> {a + b} </answer>"}) + "\n"
                            for a in range(5) for b in range(5)))
    cfg = compose([*[o for o in TINY if o.startswith(("logger", "model.tiny.pretrain_"))],  # the student's shape
                   "+experiment=r1_distill", "logger=none", f"cache_dir={cache_dir}",
                   f"run_dir={tmp_path / 'student'}", f"sft.datasets.0.path={rows}", "trainer.total_steps=2",
                   "sft.batch_size=8"])
    out = run(cfg)
    student = TokenRules.load(out["policy"])
    assert student.tokenizer.chat_template == cfg.model.tiny.chat_template
    shape = json.loads((Path(out["policy"]) / "config.json").read_text())
    teacher = json.loads((Path(tiny_model) / "config.json").read_text())
    assert (shape["hidden_size"], shape["num_hidden_layers"]) == (96, 3) != (teacher["hidden_size"],
                                                                              teacher["num_hidden_layers"])
    example = tokenize_conversation([{"role": "user", "content": "Compute 1 + 2"},
                                     {"role": "assistant", "content": " 3"}], "chat", student)
    assert student.tokenizer.decode(example.prompt_ids) == "<|user|>Compute 1 + 2<|assistant|>"
    assert example.response_ids[-1] == student.eos_id  # the template ends the turn with EOS: generation stops there
    assert json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
