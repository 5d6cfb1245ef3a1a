"""Two data-parallel training ranks update the weights exactly as one rank does on the same batch (real Ray actors,
a real gloo group), for each algorithm variant, and with fewer rows than ranks."""

import pytest
import torch
from safetensors.torch import load_file

from r1.driver import build_batch, make_loss, train_on
from r1.types import Group, Sample, collate
from r1.workers.pools import TrainPool
from tests.conftest import TINY, compose

pytestmark = pytest.mark.slow

G = 4
VARIANTS = {
    "grpo": ["algo=grpo", "algo.kl_coef=0"],
    "grpo_kl_in_loss": ["algo=grpo", "algo.kl_coef=0.05"],
    "kl_in_reward": ["algo=grpo", "algo.kl_placement=reward", "algo.kl_kind=k1", "algo.kl_coef=0.05"],
    "dapo": ["algo=dapo", "algo.minibatches_per_step=2"],
}


def _cfg(ranks: int, *extra):
    return compose(TINY + ["run_dir=unused", f"name=dp{ranks}", f"trainer.num_workers={ranks}", f"algo.group_size={G}",
                           "algo.prompts_per_step=3", "trainer.lr=1e-4", "trainer.micro_batch_size=3",
                           "algo.kl_coef=0.05", *extra])


def synthetic_groups(prompts: int, seed: int = 0) -> list[Group]:
    """Groups of random token sequences of different lengths, rewards that differ within each group."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for p in range(prompts):
        prompt = torch.randint(3, 300, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
        samples = []
        for _ in range(G):
            n = int(torch.randint(2, 10, (1,), generator=g))
            response = torch.randint(3, 300, (n,), generator=g).tolist()
            logprobs = (-torch.rand(n, generator=g) * 4).tolist()
            samples.append(Sample(prompt, response, logprobs, "", float(torch.rand(1, generator=g)), {}, None,
                                  "stop", 0))
        groups.append(Group(p, "0", samples, uid=p))
    return groups


@pytest.fixture(scope="module")
def pools(ray_local, tiny_model, tmp_path_factory):
    """A one-rank and a two-rank training pool, and the initial state both return to before each case."""
    one, two = TrainPool(_cfg(1), tiny_model), TrainPool(_cfg(2), tiny_model)
    initial = tmp_path_factory.mktemp("initial")
    one.save(str(initial), with_optimizer=True)
    yield one, two, initial
    one.shutdown()
    two.shutdown()


def _after(pool, initial, out_dir, update) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(weights, Adam's first moments, the update's stats) after ``update`` from the initial state."""
    pool.load(str(initial))
    stats = update(pool)
    pool.save(str(out_dir), with_optimizer=True)
    state = torch.load(out_dir / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    return (load_file(str(out_dir / "policy" / "model.safetensors")),
            {i: s["exp_avg"] for i, s in state.items()}, stats)


def _assert_same_update(one, two, before, lr=1e-4):
    """The same step: the weights (Adam's first step is ~lr * sign(grad), so alone they would not see a gradient
    off by a factor), Adam's first moments ((1 - beta1) * the clipped gradient) and the stats - the pre-clip
    gradient norm above all - to fp32 summation order."""
    (w1, m1, s1), (w2, m2, s2) = one, two
    for name in w1:
        assert (w1[name] - before[name]).abs().max() > 0.5 * lr, f"{name} did not move"
        assert torch.allclose(w1[name], w2[name], atol=1e-3 * lr, rtol=0), name
    assert m1.keys() == m2.keys() and m1
    for i in m1:
        torch.testing.assert_close(m2[i], m1[i], rtol=1e-4, atol=1e-9, msg=f"Adam's first moment of parameter {i}")
    assert s1.keys() == s2.keys()
    for key in ("grad_norm", "loss"):
        assert s1.get(key) is not None and abs(s1[key] - s2[key]) <= 1e-4 * abs(s1[key]) + 1e-7, (key, s1, s2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_update_as_one_rank(pools, tmp_path, variant):
    one_pool, two_pool, initial = pools
    cfg = _cfg(1, *VARIANTS[variant])
    groups = synthetic_groups(3)

    def update(pool):
        batch = build_batch(cfg, groups, 0, pool)
        return train_on(cfg, batch, pool, make_loss(cfg, 16), step=0)

    before = load_file(str(initial / "policy" / "model.safetensors"))
    one = _after(one_pool, initial, tmp_path / "one", update)
    two = _after(two_pool, initial, tmp_path / "two", update)
    _assert_same_update(one, two, before)


def test_a_rank_with_an_empty_shard_takes_part_instead_of_hanging(pools, tmp_path):
    """One row, two ranks: rank 1's shard is empty; it still joins every collective with zero gradients."""
    one_pool, two_pool, initial = pools
    cfg = _cfg(1, "algo=grpo", "algo.kl_coef=0.05")
    [group] = synthetic_groups(1)
    row = collate([group], torch.tensor([1.0, -1.0, 0.5, -0.5]), 0).select(slice(0, 1))

    def update(pool):
        row.ref_logprobs = pool.compute_logprobs(row, temperature=1.0, reference=True)
        return pool.train_step(row, make_loss(cfg, 16))

    before = load_file(str(initial / "policy" / "model.safetensors"))
    one = _after(one_pool, initial, tmp_path / "one", update)
    two = _after(two_pool, initial, tmp_path / "two", update)
    _assert_same_update(one, two, before)
