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


def _weights_after(pool, initial, out_dir, update) -> dict[str, torch.Tensor]:
    pool.load(str(initial))
    update(pool)
    pool.save(str(out_dir), with_optimizer=False)
    return load_file(str(out_dir / "policy" / "model.safetensors"))


def _assert_same_update(one, two, before, lr=1e-4):
    for name in one:
        moved = (one[name] - before[name]).abs().max()
        assert moved > 0.5 * lr, f"{name} did not move"
        # Adam's first step is ~lr * sign(grad); only the summation order of the gradient differs
        assert torch.allclose(one[name], two[name], atol=1e-3 * lr, rtol=0), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_update_as_one_rank(pools, tmp_path, variant):
    one_pool, two_pool, initial = pools
    cfg = _cfg(1, *VARIANTS[variant])
    groups = synthetic_groups(3)

    def update(pool):
        batch = build_batch(cfg, groups, 0, pool)
        train_on(cfg, batch, pool, make_loss(cfg, 16), step=0)

    before = load_file(str(initial / "policy" / "model.safetensors"))
    one = _weights_after(one_pool, initial, tmp_path / "one", update)
    two = _weights_after(two_pool, initial, tmp_path / "two", update)
    _assert_same_update(one, two, before)


def test_a_rank_with_an_empty_shard_takes_part_instead_of_hanging(pools, tmp_path):
    """One row, two ranks: rank 1's shard is empty; it still joins every collective with zero gradients."""
    one_pool, two_pool, initial = pools
    cfg = _cfg(1, "algo=grpo", "algo.kl_coef=0.05")
    [group] = synthetic_groups(1)
    row = collate([group], torch.tensor([1.0, -1.0, 0.5, -0.5]), 0).select(slice(0, 1))

    def update(pool):
        row.ref_logprobs = pool.compute_logprobs(row, temperature=1.0, reference=True)
        pool.train_step(row, make_loss(cfg, 16))

    before = load_file(str(initial / "policy" / "model.safetensors"))
    one = _weights_after(one_pool, initial, tmp_path / "one", update)
    two = _weights_after(two_pool, initial, tmp_path / "two", update)
    _assert_same_update(one, two, before)
