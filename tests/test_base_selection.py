"""Base-model selection (model.tiny.select_band): pretraining keeps the first model whose held-out pass@1 is in the
band, says so, and refuses to hand GRPO a base that never got there.

A small real pretraining run (two-operand sums, careful solutions only, a 64-wide model: ~15 s) whose held-out
pass@1 climbs from 0 through the band. The kept model is re-loaded from disk and measured again; the check itself
is compared with a per-prompt greedy reference that shares none of its batching.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from r1.config.schema import TinyModelSpec
from r1.models.tiny import (
    BaseModelOutOfBand,
    build_model,
    check_problems,
    ensure_tiny_model,
    held_out_check,
    pack_documents,
    train_tokenizer,
)

DATA = SimpleNamespace(num_operands=2, operand_low=0, operand_high=9, template="plain")
LOW, HIGH = 0.15, 1.0


def small_spec(**over) -> TinyModelSpec:
    spec = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
            "pretrain_docs": 1000, "pretrain_steps": 800, "pretrain_batch_size": 32, "pretrain_lr": 3e-3,
            "pretrain_schedule": "constant", "style_mix": {"careful": 1.0, "careless": 0.0, "malformed": 0.0},
            "select_band": [LOW, HIGH], "select_every": 20, "select_problems": 10, "select_samples": 8}
    return TinyModelSpec(**(spec | over))


def load(path):
    from transformers import AutoModelForCausalLM

    from r1.data.tokens import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(str(path))


@pytest.mark.parametrize("band, min_skill", [((LOW, HIGH), 0.0), ((0.0, 1.0), 0.25)],
                         ids=["pass@1-band", "chain-of-thought-accuracy"])
def test_selection_keeps_the_first_model_in_the_band_and_says_why(tmp_path, band, min_skill):
    spec, said = small_spec(select_band=list(band), select_min_thinking_accuracy=min_skill), []
    low, high = band
    path = ensure_tiny_model(spec, DATA, tmp_path, on_check=lambda check, band: said.append((check, band)))
    info = json.loads((path / "pretrain.json").read_text())
    selection = info["selection"]
    checks, kept = selection["checks"], selection["kept"]

    # every check was reported as it happened, against the configured band; the last one is the kept model
    assert [c for c, _ in said] == checks and all(b == band for _, b in said)
    assert checks[-1] == kept and kept["in_band"] and low <= kept["pass@1"] <= high
    assert kept["thinking_accuracy"] >= min_skill
    # it is the *first* good check: all before it failed the band or the skill, so training stopped right there
    assert len(checks) > 1, "the first check was kept: the test no longer exercises selection"
    assert all(not c["in_band"] for c in checks[:-1])
    assert all(c["pass@1"] < low or c["thinking_accuracy"] < min_skill for c in checks[:-1])
    if min_skill:  # the band is everything: each check before was refused for its chains of thought, and says so
        assert {c["why_not"] for c in checks[:-1]} == {f"chains of thought right < {100 * min_skill:.1f}%"}
    assert [c["step"] for c in checks] == list(range(20, kept["step"] + 1, 20))
    # a check starts on a quarter of the problems and stops there if pass@1 is below half the band's floor
    for c in checks:
        assert c["problems"] == (spec.select_problems // 4 if c["quick"] else spec.select_problems)
        assert not c["quick"] or (c["pass@1"] < low / 2 and "a quick look at 2 of 10 problems" in c["why_not"])
    assert any(c["quick"] for c in checks) == (low > 0) and not kept["quick"]
    assert info["steps"] == selection["kept_step"] == kept["step"] < spec.pretrain_steps
    assert f"pass@1 {100 * kept['pass@1']:.1f}% at step {kept['step']}" in selection["reason"]
    assert selection["kernels"] == torch.backends.cpu.get_cpu_capability()

    # the model on disk is the one that was measured: re-loaded, the same check gives the same pass@1
    model, tokenizer = load(path)
    # (a check in the band is repeated with a second seed, and the two averaged before it counts)
    assert kept["repeated"]
    again = [held_out_check(model, tokenizer, check_problems(DATA, spec.select_problems), template="plain",
                            samples=spec.select_samples, seed=spec.seed * 100_003 + kept["step"] + 7919 * repeat)
             for repeat in (0, 1)]
    assert (again[0]["pass@1"] + again[1]["pass@1"]) / 2 == pytest.approx(kept["pass@1"], abs=1e-12)

    # and a second call finds it in the cache instead of training again
    assert ensure_tiny_model(spec, DATA, tmp_path, on_check=lambda *a: pytest.fail("retrained")) == path


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_documents_train_as_the_padded_batch(arch):
    """Pretraining packs several documents into each row (position ids restarting per document); the reference is
    one right-padded row per document with transformers' own 2D attention mask. Same loss, same gradients: no
    document sees another, and no document's first token is predicted from the one before."""
    from r1.data.arithmetic import pretraining_corpus
    from r1.data.tokens import TokenRules

    corpus = pretraining_corpus(64, num_operands=4, low=0, high=9, seed=0, template="r1_zero",
                                mix={"careful": 0.2, "careless": 0.45, "malformed": 0.1, "practice": 0.25})
    tokenizer = train_tokenizer(corpus, 512, arch)
    model = build_model(TinyModelSpec(), tokenizer, arch)
    rules = TokenRules(tokenizer)
    docs = [rules.encode(d) + [rules.eos_id] for d in corpus[:32]]
    packed = pack_documents(docs, rules.pad_id)
    assert packed["input_ids"].shape[0] < len(docs) and packed["input_ids"].shape[1] <= max(map(len, docs))
    assert sorted(packed["input_ids"][packed["labels"] != -100].tolist()) == sorted(t for d in docs for t in d[1:])

    ids = torch.full((len(docs), max(map(len, docs))), rules.pad_id)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)], mask[row, : len(doc)] = torch.tensor(doc), 1
    reference = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = model(**packed, use_cache=False).loss
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_check_matches_a_per_prompt_greedy_reference(tmp_path):
    """held_out_check batches left-padded prompts and grades through r1's extraction; the reference generates each
    prompt alone, unpadded, greedily, and grades by integer comparison."""
    path = ensure_tiny_model(small_spec(select_band=None, pretrain_steps=240), DATA, tmp_path)
    model, tokenizer = load(path)
    problems = check_problems(DATA, 10)
    from r1.data.arithmetic import question
    from r1.data.tokens import TokenRules

    rules, right = TokenRules(tokenizer), 0
    for ops in problems:
        ids = torch.tensor([rules.encode(question(ops))])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                             pad_token_id=rules.pad_id, eos_token_id=rules.eos_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        inside = text.split("<answer>")[-1].split("</answer>")[0].strip() if "<answer>" in text else ""
        right += inside.lstrip("-").isdigit() and int(inside) == sum(ops)
    greedy = held_out_check(model, tokenizer, problems, samples=1, template="plain", seed=0, temperature=1e-6,
                            top_p=1.0)
    assert 0 < right < len(problems), "the reference should be neither all right nor all wrong"
    assert greedy["pass@1"] == right / len(problems)


def test_a_base_that_never_enters_the_band_is_an_error_not_a_model(tmp_path):
    spec = small_spec(select_band=[0.99, 1.0], pretrain_steps=40)
    with pytest.raises(BaseModelOutOfBand) as err:
        ensure_tiny_model(spec, DATA, tmp_path)
    message = str(err.value)
    assert "never entered select_band [99.0%, 100.0%] in 40 pretraining steps" in message
    assert "20: 0.0%, 40: 0.0%" in message  # the checks it made
    for remedy in ("model.tiny.pretrain_steps", "model.tiny.select_band"):
        assert remedy in message
    assert not list(tmp_path.rglob("config.json")), "nothing may be cached for a base outside the band"


def test_r1_launch_says_out_of_band_cleanly(tmp_path):
    """Through the launcher: exit 2 and the message, no traceback, nothing started."""
    import subprocess
    import sys

    from tests.conftest import REPO, TINY

    cmd = [sys.executable, "-m", "launcher.main", *TINY, f"cache_dir={tmp_path}", f"run_dir={tmp_path}/run",
           "model.tiny.select_band=[0.5,0.6]", "model.tiny.pretrain_steps=4", "model.tiny.select_every=2",
           "model.tiny.select_problems=4", "model.tiny.select_samples=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "r1-launch: model.tiny: the base model's held-out pass@1 never entered select_band [50.0%, 60.0%]" in (
        proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "base check @ 2: pass@1 0.0% (band 50-60%)" in proc.stdout
    # far below the band: the check stopped at a quarter of its problems
    assert "not kept (pass@1 below half the band's floor, a quick look at 1 of 4 problems)" in proc.stdout
