"""The planner (``plan=true``, r1/plan): its numbers against hand arithmetic and HF's own parameter counts, the
paper's run on nodes of 8 x H100, refusals that name the pool and the change that fits, and that planning starts
nothing. (Its memory terms against what the CPU engines really allocate: tests/test_plan_calibration.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.main import compose
from r1.config.validate import ConfigError
from r1.plan import make_plan, render
from r1.plan.gpus import GIB
from r1.plan.shape import PRESETS, ModelShape
from r1.plan.train_memory import TrainLayout, megatron_memory, params_per_rank

REPO = Path(__file__).resolve().parent.parent
R1_ZERO_7B = ["+experiment=r1_zero", "model=qwen2_5_7b", "cluster=slurm", "planner.gpu=h100_80gb"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_equal_the_hf_models_own(name):
    """The shape's count against transformers' model built from the same config on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    s = PRESETS[name]
    shape = {"vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.intermediate,
             "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
             "tie_word_embeddings": s.tied}
    with torch.device("meta"):
        model = (Qwen2ForCausalLM(Qwen2Config(**shape)) if s.qkv_bias else LlamaForCausalLM(LlamaConfig(**shape)))
    assert s.params() == sum(p.numel() for p in model.parameters())


def test_a_hand_computed_training_rank():
    """8 layers, hidden 1024, MLP 2816, 16 heads / 4 KV heads (head_dim 64), vocab 32000, untied, q/k/v biases;
    TP 2 x CP 2 x DP 2, bf16 with fp32 gradients, full recomputation, a 16384-token sequence; Transformer Engine."""
    shape = ModelShape("hand", 1024, 2816, 8, 16, 4, 32000, False, True, 32768)
    lay = TrainLayout(tp=2, pp=1, cp=2, dp=2, recompute="full", bf16=True, grad_fp32=True, micro_batch_tokens=8192,
                      logprob_chunk_tokens=1024)
    # a layer: q 1024x1024, k and v 1024x256 each, o 1024x1024, biases 1024 + 2x256, MLP 3 x 1024x2816, 2 norms
    layer = 1024 * (1024 + 512) + 1024 * 1024 + (1024 + 512) + 3 * 1024 * 2816 + 2 * 1024
    assert layer == 11_275_776
    per_rank_layer = (layer - 2048) // 2 + 2048  # matrices and biases halved over TP, norms whole
    embedding = 32000 * 1024 // 2  # (32000 divides by TP: no padding) one half a rank; the output layer likewise
    p = 8 * per_rank_layer + 2 * embedding + 1024  # + the final norm
    assert params_per_rank(shape, 2, 1) == p == 77_880_320
    terms = megatron_memory(shape, lay, longest_sequence=16384)
    assert terms["weights"] == 2 * p  # bf16
    assert terms["gradients"] == 4 * p  # grad_reduce_in_fp32
    assert terms["optimizer"] == 12 * p / 4  # fp32 master + Adam's 2 moments, sharded over DP 2 x CP 2
    assert terms["reference"] == 2 * p
    # the sequence (16384 > micro_batch_tokens) is its own micro-batch: 8192 tokens a CP rank. Full recomputation
    # keeps each layer's input, bf16 and fp32, split over TP by SP: (2 + 4) x 1024 / 2 bytes a token, 8 layers; and
    # one layer is recomputed whole in the backward: its norm region 26 x 1024 / 2, MLP 5 x 2816 x 2 / 2, RoPE
    # 4 x 64 x 2, flash attention's q, k, v, out (2 x 1024 + 2 x 256) x 2 / 2 + its fp32 statistics 4 x 16 / 2
    whole_layer = 26 * 1024 / 2 + 5 * 2816 * 2 / 2 + 4 * 64 * 2 + (2 * 1024 + 2 * 256) * 2 / 2 + 4 * 16 / 2
    assert whole_layer == 30_496
    # and once per micro-batch the position ids and the fp32 rotary table: 4 x 64 + 32 bytes a token
    assert terms["activations"] == 8 * 8192 * 3072 + 8192 * whole_layer + 8192 * 288 == 453_509_120
    # fp32 hidden states and their gradient (2 x 4 x 8192 x 1024), and the larger of 6 fp32 logit copies of a
    # 1024-token chunk over the rank's 16000 vocabulary entries and 3 bf16 copies of the output layer's slice
    assert 6 * 4 * 1024 * 16000 > 3 * 16000 * 1024 * 2
    assert terms["logprob_buffers"] == 2 * 4 * 8192 * 1024 + 6 * 4 * 1024 * 16000 == 460_324_864


def test_the_paper_run_on_nodes_of_8_h100_fits_and_prints_the_split():
    cfg = compose(R1_ZERO_7B)
    plan = make_plan(cfg)
    assert plan.fits, plan.refusal
    assert plan.train.gpus == plan.rollout.gpus == 8
    assert plan.train.used < plan.train.capacity
    text = render(plan)
    assert "training pool: 8 GPUs, Megatron TP 2 x PP 1 x CP 2 x DP 2, recompute full, SP  fits" in text
    assert "rollout pool: 8 GPUs, vLLM, 8 engine(s) x TP 1  fits" in text
    assert "balanced: 1 training / 1 rollout node(s)" in text
    assert plan.splits[0]["step_s"] == pytest.approx(plan.timing["step_s"], rel=0.05)  # (its best layout: the same)
    # four nodes: every split, each with the best training layout that fits it; more rollout nodes generate
    # faster, more training nodes train faster, and the split named is the one with the shortest step
    four = make_plan(compose([*R1_ZERO_7B, "cluster.slurm.train_nodes=2", "cluster.slurm.rollout_nodes=2"]))
    rows = [(r["train_nodes"], r["rollout_nodes"]) for r in four.splits]
    assert rows == [(1, 3), (2, 2), (3, 1)] and all(r["fits"] for r in four.splits)
    gen, train = [r["generation_s"] for r in four.splits], [r["training_s"] for r in four.splits]
    assert gen == sorted(gen) and train == sorted(train, reverse=True)
    best = min(four.splits, key=lambda r: r["step_s"])
    assert f"balanced: {best['train_nodes']} training / {best['rollout_nodes']} rollout node(s)" in render(four)


ONE_GPU_EACH = [*R1_ZERO_7B, "trainer.num_workers=1", "trainer.megatron.tensor_parallel=1",
                "trainer.megatron.context_parallel=1", "rollout.num_workers=1", "cluster.slurm.gpus_per_node=1"]


def test_65k_on_one_gpu_per_pool_is_refused_naming_the_pool_and_the_fix(tmp_path):
    cfg = compose([*ONE_GPU_EACH, "cluster.slurm.partition=gpu", f"cluster.slurm.shared_dir={tmp_path}",
                   "cluster.dry_run=true", f"run_dir={tmp_path}/run"])
    plan = make_plan(cfg)
    assert not plan.train.fits and plan.rollout.fits  # (a 7B engine with its KV cache fits on one H100)
    assert "66048-token sequence, the h100_80gb leaves it 79.6 GiB" in plan.train.problem
    # the fix is a layout that fits, on more GPUs (1-GPU nodes: no TP across nodes), and the nodes for them
    assert "trainer.num_workers=8" in plan.train.fix and "cluster.slurm.train_nodes=8" in plan.train.fix
    assert "trainer.megatron.tensor_parallel=2" not in plan.train.fix
    from launcher.slurm import submit

    with pytest.raises(ConfigError, match="the training pool does not fit") as refused:
        submit(cfg)
    assert "fits with: trainer.num_workers=8" in str(refused.value) and "planner.check=false" in str(refused.value)
    assert not (tmp_path / "run" / "job.sbatch").exists()
    cfg.planner.check = False  # overridden: rendered (a dry run) despite the plan
    script, _ = submit(cfg)
    assert script.is_file()


def test_a_rollout_pool_that_cannot_hold_the_model_is_refused_with_more_tensor_parallelism():
    plan = make_plan(compose(["+experiment=r1_zero", "model=qwen2_5_32b", "cluster=slurm", "planner.gpu=a100_40gb",
                              "trainer.num_workers=64", "trainer.megatron.tensor_parallel=4",
                              "trainer.megatron.context_parallel=4", "trainer.megatron.pipeline_parallel=4",
                              "cluster.slurm.train_nodes=8"]))
    assert plan.train.fits, plan.train.problem
    assert not plan.rollout.fits and "exceed gpu_memory_utilization" in plan.rollout.problem
    assert plan.rollout.fix[:3] == ["rollout.vllm.tensor_parallel_size=4", "rollout.gpus_per_worker=4",
                                    "rollout.num_workers=2"]
    fixed = make_plan(compose(["+experiment=r1_zero", "model=qwen2_5_32b", "cluster=slurm", "planner.gpu=a100_40gb",
                               "trainer.num_workers=64", "trainer.megatron.tensor_parallel=4",
                               "trainer.megatron.context_parallel=4", "trainer.megatron.pipeline_parallel=4",
                               "cluster.slurm.train_nodes=8", *plan.rollout.fix]))
    assert fixed.fits, fixed.refusal


def test_colocated_engines_leave_the_training_ranks_the_rest_of_each_gpu():
    """rollout.placement=colocated: engine i on training rank i's GPU; the rank has what vLLM's share leaves."""
    args = ["+experiment=r1_zero", "model=qwen2_5_1_5b", "planner.gpu=h100_80gb", "rollout.placement=colocated",
            "trainer.num_workers=8", "rollout.num_workers=8", "rollout.length_schedule=[{from_step: 0, max_tokens: 8192}]",
            "eval.max_new_tokens=8192", "rollout.vllm.max_model_len=8704"]
    for share, fits in ((0.3, True), (0.9, False)):
        plan = make_plan(compose([*args, f"rollout.vllm.gpu_memory_utilization={share}"]))
        assert plan.train.capacity == pytest.approx(plan.gpu.memory_bytes * (1 - share))
        assert plan.train.fits is fits, plan.train.problem


def test_the_gpu_kind_comes_from_the_cluster_or_is_given(tmp_path, monkeypatch):
    k8s = compose(["+experiment=r1_zero", "cluster=k8s",
                   "+cluster.k8s.train.node_selector={nvidia.com/gpu.product: NVIDIA-A100-SXM4-40GB}"])
    assert make_plan(k8s).gpu.name == "a100_40gb"
    sinfo = tmp_path / "bin" / "sinfo"  # a partition whose nodes' gres name H200s
    sinfo.parent.mkdir()
    sinfo.write_text("#!/bin/sh\necho 'gpu:h200:8'\n")
    sinfo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sinfo.parent}:{os.environ['PATH']}")
    plan = make_plan(compose(["+experiment=r1_zero", "cluster=slurm", "cluster.slurm.partition=big"]))
    assert plan.gpu.name == "h200_141gb" and "gres" in plan.gpu_source
    assert make_plan(compose(["+experiment=r1_zero", "cluster=slurm", "planner.gpu=a100_80gb"])).gpu.name == (
        "a100_80gb")
    with pytest.raises(ValueError, match="choose one of a100_40gb, a100_80gb, h100_80gb, h200_141gb"):
        make_plan(compose(["+experiment=r1_zero", "planner.gpu=b200"]))


def test_plan_true_starts_nothing_and_submits_nothing(tmp_path):
    """r1-launch ... plan=true in a fresh interpreter: the plan is printed; Ray, vLLM and Megatron are never imported,
    no process group is formed, and sbatch, helm and kubectl (stand-ins that leave a mark) are never called."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("sbatch", "helm", "kubectl"):
        (fake / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/{tool}-was-called\n")
        (fake / tool).chmod(0o755)
    probe = ("import runpy, sys\n"
             "sys.argv = ['r1-launch', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('launcher.main', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('IMPORTED', sorted(m for m in ('ray', 'vllm', 'megatron') if m in sys.modules))\n"
             "dist = sys.modules.get('torch.distributed')\n"
             "print('PROCESS GROUP', bool(dist and dist.is_available() and dist.is_initialized()))\n"
             "print('EXIT', code)\n")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    for args, code in (([*ONE_GPU_EACH, "cluster.slurm.partition=gpu", f"cluster.slurm.shared_dir={tmp_path}"], 1),
                       ([*R1_ZERO_7B, "cluster.slurm.partition=gpu", f"cluster.slurm.shared_dir={tmp_path}"], 0),
                       (["+experiment=r1_zero", "cluster=k8s"], 0), ([], 0)):
        done = subprocess.run([sys.executable, "-c", probe, *args, "plan=true", f"run_dir={tmp_path}/run"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert "r1 plan:" in done.stdout, done.stderr
        assert f"EXIT {code}" in done.stdout and "IMPORTED []" in done.stdout, done.stdout + done.stderr
        assert "PROCESS GROUP False" in done.stdout
    assert not list(tmp_path.glob("*-was-called")) and not (tmp_path / "run").exists()


def test_plan_numbers_for_the_worked_example_in_the_docs():
    """docs/plan.md's worked example (Qwen2.5-Math-7B, R1-Zero, 32K then 65K): the doc's table is this output."""
    for longest in (32768, 65536):
        cfg = compose(["+experiment=r1_zero", "model=qwen2_5_math_7b", "cluster=slurm", "planner.gpu=h100_80gb",
                       f"rollout.length_schedule=[{{from_step: 0, max_tokens: {longest}}}]",
                       f"rollout.vllm.max_model_len={longest + 512}"])
        plan = make_plan(cfg)
        assert plan.fits, plan.refusal
        assert any("trained on 4096 positions" in n for n in plan.rollout.notes)
        docs = (REPO / "docs" / "plan.md").read_text()
        assert f"{plan.train.used / GIB:.1f} GiB" in docs and f"{plan.timing['step_s']:.0f} s" in docs
