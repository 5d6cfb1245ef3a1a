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
