"""Megatron-core models built from HF checkpoints (mbridge), on real gloo ranks: same logits as HF transformers at
TP=1, TP=2 and PP=2, and HF -> Megatron -> HF is bit-identical. The reference is transformers' own forward."""

from __future__ import annotations

import pytest
import torch

from tests.gloo_ranks import run_ranks

pytestmark = pytest.mark.slow

VOCAB = 131  # odd: TP=2 pads the vocabulary, and the padding must not leak into the logits
SEQ = 12


def _save_hf(path, arch: str, tied: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
             "initializer_range": 0.2, "tie_word_embeddings": tied}
    torch.manual_seed(0)
    if arch == "qwen2":  # q/k/v biases, GQA
        model = Qwen2ForCausalLM(Qwen2Config(**shape, rope_theta=10000.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, rope_theta=500000.0))
    with torch.no_grad():  # HF initialises biases and norms to constants: make every tensor distinct
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return str(path)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _megatron(tp: int, pp: int, hf_dir: str):
    from r1.engines.megatron import bridge, cpu_compat
    from r1.engines.megatron.layout import ParallelLayout, initialize

    cpu_compat.apply()
    initialize(ParallelLayout(tp=tp, pp=pp), tp * pp, seed=0)
    b = bridge.make_bridge(hf_dir, tp_size=tp, params_dtype=torch.float32)
    return b, bridge.load(b, hf_dir, bf16=False)


def _logits_on_rank(rank: int, world: int, hf_dir: str, tp: int, pp: int):
    """Full-vocabulary logits on the last pipeline stage (gathered over TP), None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    _, chunks = _megatron(tp, pp, hf_dir)
    ids = _ids()
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    outputs = []

    def forward_step(data, model):
        out = model(input_ids=next(data), position_ids=torch.arange(SEQ).expand(2, -1), attention_mask=mask)

        def keep(output):
            outputs.append(output.detach())
            return output.sum() * 0, {}

        return out, keep

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]),
                                    model=[c.eval() for c in chunks], num_microbatches=1, seq_length=SEQ,
                                    micro_batch_size=2, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(outputs[0])


def _export_on_rank(rank: int, world: int, hf_dir: str, tp: int, pp: int):
    from r1.engines.megatron import bridge

    b, chunks = _megatron(tp, pp, hf_dir)
    return {name: t.clone() for name, t in bridge.export(b, chunks)}


MODELS = [("qwen2", True), ("qwen2", False), ("llama", False)]


# every model at TP=2 (its weights split by the bridge); at PP=2 the tied embedding (shared by the first and the last
# stage) and an untied one; TP=1 (no split) is the Megatron engine's own test (tests/test_megatron_engine.py)
@pytest.mark.parametrize("arch,tied,tp,pp", [
    ("qwen2", True, 2, 1), ("qwen2", False, 2, 1), ("llama", False, 2, 1), ("qwen2", True, 1, 2), ("llama", False, 1, 2),
], ids=["tp2-qwen2-tied", "tp2-qwen2-untied", "tp2-llama", "pp2-qwen2-tied", "pp2-llama"])
def test_megatron_logits_equal_transformers(tmp_path, arch, tied, tp, pp):
    from transformers import AutoModelForCausalLM

    hf_dir = _save_hf(tmp_path / "hf", arch, tied)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(input_ids=_ids()).logits
    last = run_ranks(_logits_on_rank, tp * pp, hf_dir, tp, pp, tmp_path=tmp_path)[-1]
    assert last.shape[-1] == VOCAB + (VOCAB % tp and tp - VOCAB % tp)  # padded to a multiple of TP
    assert expected.abs().max() > 1.0  # logits with something to compare
    torch.testing.assert_close(last[..., :VOCAB], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,tied", MODELS, ids=["qwen2-tied", "qwen2-untied", "llama"])
def test_hf_to_megatron_tp2_and_back_is_bit_identical(tmp_path, arch, tied):
    from r1.engines.hf_train import load_safetensors_dir

    hf_dir = _save_hf(tmp_path / "hf", arch, tied)
    original = load_safetensors_dir(tmp_path / "hf")
    for exported in run_ranks(_export_on_rank, 2, hf_dir, 2, 1, tmp_path=tmp_path):  # every rank sees it all
        assert set(exported) == set(original)
        for name, tensor in original.items():
            assert torch.equal(exported[name], tensor), name
