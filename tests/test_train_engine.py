"""The training side against references: fp32 vs bf16 steps, the textbook minibatch loop, a hand-counted pass."""

import pytest
import torch

from r1.algo import GRPOLoss
from r1.driver import make_loss, train_on
from r1.engines.hf_train import HFTrainEngine
from r1.types import TrainBatch
from tests.conftest import TINY, compose


def _engine(model_path, **kw):
    args = {"lr": 3e-6, "betas": (0.9, 0.99), "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 1.0,
            "micro_batch_size": 4, "with_reference": False}
    return HFTrainEngine(model_path, **{**args, **kw})


def synthetic_batch(rows: int, seed: int = 0, width: int = 20) -> TrainBatch:
    """Random sequences of different lengths (right-padded), 8-token prompts, random advantages."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (rows, width), generator=g)
    lengths = torch.randint(12, width + 1, (rows,), generator=g)
    attn = (torch.arange(width) < lengths[:, None]).long()
    resp = attn.float() * (torch.arange(width) >= 8).float()
    rollout = -torch.rand(rows, width, generator=g) * 3 * resp
    return TrainBatch(ids * attn, attn, resp, torch.randn(rows, generator=g), rollout_logprobs=rollout)


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def test_bf16_step_moves_the_weights_as_the_fp32_step_does(tiny_model, tmp_path):
    """At lr 3e-6 a bf16 parameter cannot hold an Adam update (8 significant bits): the fp32 masters must."""
    steps = {}
    for dtype in ("float32", "bfloat16"):
        engine = _engine(tiny_model, dtype=dtype)
        before = _params(engine)
        engine.train_step(synthetic_batch(8), GRPOLoss())
        steps[dtype] = (engine, {n: p - before[n] for n, p in _params(engine).items()})
    fp32 = torch.cat([d.flatten() for d in steps["float32"][1].values()])
    bf16 = torch.cat([d.flatten() for d in steps["bfloat16"][1].values()])
    # Adam's first step is ~lr * sign(grad) per weight; bf16 compute changes few signs
    assert (fp32.abs() > 0.5 * 3e-6).float().mean() > 0.99
    assert ((bf16 - fp32).abs() <= 0.01 * 3e-6).float().mean() > 0.98
    assert (bf16 - fp32).norm() / fp32.norm() < 0.2

    engine = steps["bfloat16"][0]
    served = dict(engine.named_weights())  # what the rollout pool receives: the masters in the serving dtype
    for name, master in _params(engine).items():
        assert master.dtype == torch.float32 and served[name].dtype == torch.bfloat16
        assert torch.equal(served[name], master.to(torch.bfloat16))
    engine.save(tmp_path / "ckpt", with_optimizer=True)  # exported in bf16, masters kept: resume is exact
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "policy", dtype="auto")
    assert exported.dtype == torch.bfloat16
    assert torch.equal(exported.model.norm.weight, served["model.norm.weight"])
    resumed = _engine(tiny_model, dtype="bfloat16")
    resumed.load(tmp_path / "ckpt")
    for name, master in _params(engine).items():
        assert torch.equal(dict(resumed.model.named_parameters())[name], master)


def _cfg(*extra):
    return compose(TINY + ["run_dir=unused", *extra])


@pytest.mark.parametrize("rows, minibatches", [(5, 4), (7, 3), (8, 8), (16, 1)])
def test_minibatches_per_step_gives_exactly_that_many_optimizer_steps(tiny_model, rows, minibatches):
    cfg = _cfg(f"algo.minibatches_per_step={minibatches}", "algo.kl_coef=0")
    engine = _engine(tiny_model)  # an engine serves as a one-rank pool: same compute_logprobs / train_step
    stats = train_on(cfg, synthetic_batch(rows), engine, make_loss(cfg, 20), step=0)
    [state] = [engine.optimizer.state[p] for p in engine.model.parameters()][:1]
    assert int(state["step"]) == minibatches == stats["optimizer_steps"]


def _count_forwards(engine) -> list[int]:
    calls = []
    engine.model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_one_minibatch_takes_pi_old_from_the_training_forward(tiny_model):
    """With one optimizer step per batch the proximal policy is the current one: no separate pass, same update."""
    cfg = _cfg("algo.minibatches_per_step=1", "algo.kl_coef=0", "trainer.micro_batch_size=4")
    batch = synthetic_batch(8)
    engine = _engine(tiny_model, lr=1e-3)
    calls = _count_forwards(engine)
    train_on(cfg, batch, engine, make_loss(cfg, 20), step=0)
    assert len(calls) == 2  # two micro-batches of 4, the training forwards only

    reference = _engine(tiny_model, lr=1e-3)  # the textbook way: pi_old from its own pass, then the update
    explicit = batch.select(slice(None))
    explicit.old_logprobs = reference.compute_logprobs(explicit, temperature=1.0)
    reference.train_step(explicit, make_loss(cfg, 20))
    for (name, a), b in zip(_params(engine).items(), _params(reference).values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name

    cfg2 = _cfg("algo.minibatches_per_step=2", "algo.kl_coef=0", "trainer.micro_batch_size=4")
    engine2 = _engine(tiny_model)
    calls = _count_forwards(engine2)
    train_on(cfg2, batch, engine2, make_loss(cfg2, 20), step=0)
    assert len(calls) == 2 + 2  # pi_old over the whole batch once, then one forward per minibatch


def _varied_prompts_batch(rows: int = 6, width: int = 24) -> TrainBatch:
    """Prompts of 5-12 tokens, responses up to the row's length: the first response column differs per row."""
    g = torch.Generator().manual_seed(3)
    batch = synthetic_batch(rows, seed=3, width=width)
    starts = torch.randint(5, 13, (rows,), generator=g)
    batch.response_mask = batch.attention_mask.float() * (torch.arange(width) >= starts[:, None]).float()
    batch.rollout_logprobs = batch.rollout_logprobs.abs().neg() * batch.response_mask
    return batch


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_equal_a_full_vocabulary_pass_where_the_loss_reads_them(tiny_model, temperature):
    """The engine projects only positions that predict response tokens, with one log-softmax for both log-prob and
    entropy; the HF model's own full forward (every position, two separate softmaxes) must give the same numbers on
    the response mask."""
    engine = _engine(tiny_model)
    batch = _varied_prompts_batch()
    mask = batch.response_mask.bool()
    with torch.no_grad():
        logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1] / temperature
    full_logp = torch.nn.functional.pad(torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0],
                                        (1, 0))
    full_entropy = torch.nn.functional.pad(torch.distributions.Categorical(logits=logits).entropy(), (1, 0))

    recomputed = engine.compute_logprobs(batch, temperature=temperature)
    assert torch.allclose(recomputed[mask], full_logp[mask], atol=1e-6, rtol=0)
    stats = engine.train_step(batch, GRPOLoss(temperature=temperature))
    # the stat is each micro-batch's token mean, weighted by its share of the sequences (micro_batch_size 4)
    expected_entropy = sum(float(full_entropy[i:i + 4][mask[i:i + 4]].mean()) * len(mask[i:i + 4]) / len(mask)
                           for i in range(0, len(mask), 4))
    assert stats["entropy"] == pytest.approx(expected_entropy, abs=1e-5)


def test_reference_logprobs_inside_the_update_equal_a_separate_pass(tiny_model):
    """A KL-in-loss update computes the reference log-probs itself, per micro-batch: the same update, bit for bit,
    as the two-call way (reference pass first, then the update with them)."""
    loss = GRPOLoss(kl_coef=0.05, kl_in_loss=True)
    assert loss.needs_reference
    batch = _varied_prompts_batch(rows=10)
    inside = _engine(tiny_model, lr=1e-3, with_reference=True)
    for p in inside.reference.parameters():  # a reference that differs from the policy, so the KL term acts
        p.data.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    two_calls = _engine(tiny_model, lr=1e-3, with_reference=True)
    two_calls.reference.load_state_dict(inside.reference.state_dict())

    stats = inside.train_step(batch.select(slice(None)), loss)
    explicit = batch.select(slice(None))
    explicit.ref_logprobs = two_calls.compute_logprobs(explicit, temperature=1.0, reference=True)
    explicit_stats = two_calls.train_step(explicit, loss)
    assert stats["kl"] == explicit_stats["kl"] > 0
    for (name, a), b in zip(_params(inside).items(), _params(two_calls).values()):
        assert torch.equal(a, b), name


def _groups_batch(tiny_model, prompts=(7, 10, 9), group=4, seed=0, longer=False) -> TrainBatch:
    """GRPO-shaped batch: each prompt (of the given lengths) with ``group`` responses shorter than it (``longer``:
    longer than it), rows shuffled as the update sees them."""
    from r1.types import Group, Sample, collate

    g = torch.Generator().manual_seed(seed)
    groups = []
    for i, plen in enumerate(prompts):
        prompt = torch.randint(3, 300, (plen,), generator=g).tolist()
        samples = []
        for _ in range(group):
            n = int(torch.randint(plen + 1, plen + 4, (1,), generator=g) if longer else
                    torch.randint(1, plen, (1,), generator=g))
            samples.append(Sample(prompt, torch.randint(3, 300, (n,), generator=g).tolist(),
                                  (-torch.rand(n, generator=g)).tolist(), "", 0.0, {}, None, "stop", 0))
        groups.append(Group(i, "0", samples))
    batch = collate(groups, torch.randn(len(prompts) * group, generator=g), 0)
    return batch.select(torch.randperm(len(batch), generator=g))


def test_shared_prompt_packing_gives_the_rows_logprobs_entropy_and_gradients(tiny_model):
    """Each group packed as [prompt | responses...] with a 4-D mask and position ids: the log-probs, entropies and
    gradients equal the HF model's own forward of every row on its own (the reference, unpacked and unpadded)."""
    from r1.engines.prompt_packing import pack_by_prompt

    batch = _groups_batch(tiny_model)
    packed = pack_by_prompt(batch)
    assert packed is not None and len(packed.input_ids) == 3  # one row per prompt
    engine = _engine(tiny_model, micro_batch_size=64)
    logp, entropy = engine._response_logprobs(engine.model, batch, 0.7, with_entropy=True)
    (logp * batch.response_mask).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}

    engine.model.zero_grad()
    mask = batch.response_mask.bool()
    total = 0.0
    for row in range(len(batch)):
        n = int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row : row + 1, :n]
        logits = engine.model(input_ids=ids).logits[0, :-1] / 0.7
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        cols = mask[row, 1:n]
        assert torch.allclose(logp[row, 1:n][cols], lp[cols].detach(), atol=2e-5, rtol=0)
        ent = torch.distributions.Categorical(logits=logits.detach()).entropy()
        assert torch.allclose(entropy[row, 1:n][cols], ent[cols], atol=2e-5, rtol=0)
        total = total + lp[cols].sum()
    total.backward()
    for name, p in engine.model.named_parameters():
        assert torch.allclose(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_groups_with_long_responses_or_no_shared_prompt_are_not_packed(tiny_model):
    """A prompt shorter than its longest response is left unpacked (its attention would cost more than the prompt
    tokens it saves), and so is a batch whose rows share no prompt."""
    from r1.engines.prompt_packing import pack_by_prompt

    assert pack_by_prompt(_groups_batch(tiny_model, prompts=(4, 5), longer=True)) is None
    assert pack_by_prompt(synthetic_batch(6)) is None


def test_packed_updates_are_reproducible_bit_for_bit(tiny_model):
    """Fresh engines, the same shared-prompt batch: the same weights, bit for bit (exact resume depends on it; a
    position read by several responses would have its gradient summed in a run-dependent order)."""
    batch = _groups_batch(tiny_model, prompts=(12, 14, 11), group=6)
    results = []
    for _ in range(3):
        engine = _engine(tiny_model, lr=1e-3, micro_batch_size=64)
        engine.train_step(batch.select(slice(None)), GRPOLoss())
        results.append(_params(engine))
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(value, other[name]), name
