"""GSPO, CISPO, RLOO, REINFORCE++, the off-policy corrections and DAPO's overlong penalty: each on a small batch
computed by hand (the arithmetic is written next to the numbers), then equal to verl's own implementation
(``verl.trainer.ppo.core_algos`` / ``rollout_corr_helper``, verl 0.9.1 installed with --no-deps) on random inputs."""

import math

import numpy as np
import pytest
import torch

# the reference: verl (locks/test-reference.txt, installed by `make install` without its dependencies)
from verl.trainer.ppo import core_algos as verl_algos
from verl.trainer.ppo import rollout_corr_helper as verl_corr
from verl.workers.config import ActorConfig

from r1.algo import (
    cispo_loss,
    gspo_loss,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    rollout_correction,
)
from r1.rewards.overlong import overlong_buffer_tokens, overlong_penalty

LN = math.log
# two sequences: row 0 has 3 response tokens with rho = pi_old / mu = 1, 3, 1/4; row 1 has 2 with rho = 2, 1/2
RHO = torch.tensor([[1.0, 3.0, 0.25, 1.0], [2.0, 0.5, 1.0, 1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
ROLLOUT = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.7, -2.0, -2.0]])
OLD = ROLLOUT + RHO.log()


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


# --- off-policy corrections, by hand -------------------------------------------------------------------------------
def test_token_truncated_is_by_hand():
    w, s = rollout_correction(OLD, ROLLOUT, MASK, is_level="token", is_cap=2.0)
    _close(w, [[1.0, 2.0, 0.25, 0.0], [2.0, 0.5, 0.0, 0.0]])  # min(rho, 2), 0 off the mask
    assert s["is_clipped_fraction"] == pytest.approx(1 / 5)  # only rho = 3 is truncated
    assert s["is_weight_mean"] == pytest.approx((1 + 3 + 0.25 + 2 + 0.5) / 5)  # 1.35, before truncation
    assert s["is_weight_max"] == pytest.approx(3.0)
    assert s["is_log_ratio_abs_mean"] == pytest.approx((0 + LN(3) + LN(4) + LN(2) + LN(2)) / 5)  # 0.7742
    assert s["is_ratio_p50"] == pytest.approx(1.0)  # sorted: 1/4, 1/2, 1, 2, 3
    assert s["mask_token_fraction"] == 0.0


def test_token_mask_is_icepop_by_hand():
    w, s = rollout_correction(OLD, ROLLOUT, MASK, is_level="token", is_cap=2.0, mask_level="token", mask_low=0.45,
                              mask_high=2.5)
    # rho 3 and 1/4 leave [0.45, 2.5]: weight 0; the others keep min(rho, 2)
    _close(w, [[1.0, 0.0, 0.0, 0.0], [2.0, 0.5, 0.0, 0.0]])
    assert s["mask_token_fraction"] == pytest.approx(2 / 5)
    assert s["mask_seq_fraction"] == pytest.approx(1 / 2)


def test_sequence_truncated_is_by_hand():
    w, _ = rollout_correction(OLD, ROLLOUT, MASK, is_level="sequence", is_cap=2.0)
    _close(w, [[0.75, 0.75, 0.75, 0.0], [1.0, 1.0, 0.0, 0.0]])  # 1 * 3 * 1/4 = 0.75; 2 * 1/2 = 1
    w, s = rollout_correction(OLD, ROLLOUT, MASK, is_level="sequence", is_cap=0.8)
    _close(w, [[0.75, 0.75, 0.75, 0.0], [0.8, 0.8, 0.0, 0.0]])  # the product 1 is truncated at 0.8
    assert s["is_clipped_fraction"] == pytest.approx(2 / 5)  # row 1's two tokens


def test_sequence_mask_uses_the_geometric_mean_by_hand():
    # row 0: (1 * 3 * 1/4) ** (1/3) = 0.9086; row 1: (2 * 1/2) ** (1/2) = 1
    w, s = rollout_correction(OLD, ROLLOUT, MASK, is_level="none", mask_level="sequence", mask_low=0.9,
                              mask_high=1.1)
    _close(w, MASK)
    w, s = rollout_correction(OLD, ROLLOUT, MASK, is_level="none", mask_level="sequence", mask_low=0.95,
                              mask_high=1.1)
    _close(w, [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert s["mask_token_fraction"] == pytest.approx(3 / 5) and s["mask_seq_fraction"] == pytest.approx(1 / 2)


def test_corrections_never_see_padding_even_when_it_holds_inf():
    old, rollout = OLD.clone(), ROLLOUT.clone()
    old[0, 3], rollout[1, 2] = float("inf"), float("-inf")
    for is_level in ("token", "sequence"):
        for mask_level in ("none", "token", "sequence"):
            w, s = rollout_correction(old, rollout, MASK, is_level=is_level, mask_level=mask_level)
            assert torch.isfinite(w).all() and (w[MASK == 0] == 0).all()
            assert all(math.isfinite(v) for v in s.values())


# --- policy losses, by hand ------------------------------------------------------------------------------------------
def test_gspo_clips_the_length_normalised_sequence_ratio_by_hand():
    old = torch.tensor([[-1.0, -2.0]])
    logp = (old + torch.tensor([[LN(1.5), 0.0]])).requires_grad_()
    mask = torch.ones(1, 2)
    # s = exp((ln 1.5 + 0) / 2) = sqrt(1.5) = 1.2247 for both tokens
    loss, stats = gspo_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert float(loss) == pytest.approx(-1.2)  # A = 1: max(-1.2247, -clip(1.2247, 0.8, 1.2) = -1.2)
    assert stats["clip_fraction"] == 1.0 and stats["ratio_mean"] == pytest.approx(math.sqrt(1.5))
    loss.backward()
    _close(logp.grad, [[0.0, 0.0]])  # clipped: no gradient
    logp.grad = None
    loss, _ = gspo_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert float(loss) == pytest.approx(math.sqrt(1.5))  # A = -1: max(1.2247, 1.2)
    loss.backward()
    # d/d logp_t of mean_t(-A * sg[s] * exp(logp_t - sg[logp_t])) = s / 2: the sequence's gradient, shared
    _close(logp.grad, [[math.sqrt(1.5) / 2, math.sqrt(1.5) / 2]])
    # PPO on the same tokens clips token 0 alone (ratio 1.5) and keeps token 1 (ratio 1): another update
    ppo, ppo_stats = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert float(ppo) == pytest.approx(-(1.2 + 1.0) / 2) and ppo_stats["clip_fraction"] == 0.5


def test_cispo_clips_the_weight_and_keeps_every_gradient_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 8.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = logp.detach() - ratio.log()
    loss, stats = cispo_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 3), clip_low=1.0, clip_high=4.0)
    # weights clip(r, 0, 5) = 1.5, 0.5, 5; terms -w * A * logp = 3, 2, 5; token mean 10/3
    assert float(loss) == pytest.approx(10 / 3)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    loss.backward()
    _close(logp.grad, [[-1.5 * 2 / 3, -0.5 * 2 / 3, -5 * 2 / 3]])  # -w * A / 3: the clipped token still has one


# --- advantages, by hand ---------------------------------------------------------------------------------------------
def test_rloo_is_reward_minus_the_mean_of_the_others_by_hand():
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0]), 4)
    # group 0: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - 2/3 ...; group 1: 2 - (2 + 2 + 5) / 3 = -1, 5 - 2 = 3
    _close(adv, [2 / 3, -2 / 3, -2 / 3, 2 / 3, -1.0, -1.0, -1.0, 3.0])


def test_reinforce_pp_whitens_over_the_batch_tokens_by_hand():
    rewards, lengths = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([1, 3, 2, 2])
    adv = reinforce_pp_advantages(rewards, lengths, 2, group_baseline=True)
    # baseline: 0.5, -0.5 | 0, 0. Token mean: (0.5 * 1 - 0.5 * 3) / 8 = -0.125. Token variance (unbiased):
    # (1 * 0.625**2 + 3 * 0.375**2 + 4 * 0.125**2) / 8 * 8/7 = 0.875 / 7 = 0.125; std 0.35355
    std = math.sqrt(0.125)
    _close(adv, [0.625 / std, -0.375 / std, 0.125 / std, 0.125 / std])
    plain = reinforce_pp_advantages(rewards, lengths, 2, group_baseline=False)
    # no baseline: values 1, 0, 1, 1; token mean (1 + 0 + 2 + 2) / 8 = 0.625; variance (1 * 0.375**2 + 3 *
    # 0.625**2 + 4 * 0.375**2) / 7 = (0.140625 + 1.171875 + 0.5625) / 7 = 0.267857
    std = math.sqrt(1.875 / 7)
    _close(plain, [0.375 / std, -0.625 / std, 0.375 / std, 0.375 / std])


def test_overlong_penalty_by_hand():
    # DAPO's run: budget 20480, buffer 4096 (the share 0.2)
    assert overlong_buffer_tokens(20480, 0.2) == 4096
    assert overlong_penalty(16384, 20480, 4096) == 0.0  # up to the budget minus the buffer: nothing
    assert overlong_penalty(18432, 20480, 4096) == pytest.approx(-0.5)  # half way through the buffer
    assert overlong_penalty(20480, 20480, 4096) == pytest.approx(-1.0)  # at the budget (cut off)
    assert overlong_penalty(30000, 20480, 4096, factor=0.5) == pytest.approx(-0.5)  # beyond: the full factor
    with pytest.raises(ValueError, match="at least one token"):
        overlong_penalty(10, 20, 0)


# --- equal to verl on random inputs ------------------------------------------------------------------------------------

SEEDS = range(5)


def _random_batch(seed: int, rows: int = 12, width: int = 20, spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    rollout = -torch.rand(rows, width, generator=g) * 3
    old = rollout + torch.randn(rows, width, generator=g) * spread
    logp = old + torch.randn(rows, width, generator=g) * 0.1
    adv = torch.randn(rows, generator=g)
    return old, rollout, logp, adv, mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_is_equals_verl(seed, level):
    old, rollout, _, _, mask = _random_batch(seed, spread=0.1 if level == "sequence" else 0.6)
    ours, _ = rollout_correction(old, rollout, mask, is_level=level, is_cap=2.0)
    theirs, _ = verl_corr.compute_rollout_correction_weights(old - rollout, mask, rollout_is=level,
                                                             rollout_is_threshold=2.0)
    _close(ours, theirs * mask)


@pytest.mark.parametrize("seed", SEEDS)
def test_token_mask_equals_verl_icepop(seed):
    """IcePop = truncation at the upper bound and zero outside [low, high]: verl's "low_high" threshold."""
    old, rollout, _, _, mask = _random_batch(seed)
    ours, s = rollout_correction(old, rollout, mask, is_level="token", is_cap=5.0, mask_level="token",
                                 mask_low=0.5, mask_high=5.0)
    theirs, m = verl_corr.compute_rollout_correction_weights(old - rollout, mask, rollout_is="token",
                                                             rollout_is_threshold="0.5_5.0")
    _close(ours, theirs * mask)
    assert 0 < s["mask_token_fraction"] == pytest.approx(m["rollout_is_oob_ratio"])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("level", "verl_option"), [("token", "token_k1"), ("sequence", "seq_mean_k1")])
def test_masks_equal_verl_rejection(seed, level, verl_option):
    """Which tokens/sequences are dropped: verl's rejection sampling (its k1 bounds are on mu / pi_old, hence the
    inverted interval); verl removes them from the response mask, r1 weighs them 0."""
    old, rollout, _, _, mask = _random_batch(seed)
    low, high = (0.8, 1.5) if level == "token" else (0.85, 1.15)  # (a mean of log-ratios spreads less)
    ours, _ = rollout_correction(old, rollout, mask, is_level="none", mask_level=level, mask_low=low, mask_high=high)
    kept, _ = verl_corr.compute_rollout_rejection_mask(old - rollout, mask, rollout_rs=verl_option,
                                                       rollout_rs_threshold=f"{1 / high}_{1 / low}")
    assert 0 < int((ours == 0).logical_and(mask.bool()).sum()) < int(mask.sum())  # some dropped, not all
    _close(ours, kept)


def _verl_loss(name, logp, old, adv, mask, low, high, agg):
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=low,
                      clip_ratio_high=high)
    fn = verl_algos.get_policy_loss_fn(name)
    return fn(old, logp, adv[:, None].expand_as(logp) * mask, mask, loss_agg_mode=agg, config=cfg)[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("ours", "name", "low", "high", "agg", "verl_agg"), [
    (gspo_loss, "gspo", 3e-4, 4e-4, "seq_mean_token_mean", "seq-mean-token-mean"),
    (cispo_loss, "cispo", 1.0, 4.0, "token_mean", "token-mean"),
    (policy_loss, "vanilla", 0.2, 0.28, "token_mean", "token-mean"),
])
def test_policy_losses_and_gradients_equal_verl(seed, ours, name, low, high, agg, verl_agg):
    old, _, logp, adv, mask = _random_batch(seed)
    mine = logp.clone().requires_grad_()
    theirs = logp.clone().requires_grad_()
    loss, _ = ours(mine, old, adv, mask, clip_low=low, clip_high=high, agg=agg)
    ref = _verl_loss(name, theirs, old, adv, mask, low, high, verl_agg)
    _close(loss, ref)
    loss.backward()
    ref.backward()
    _close(mine.grad * mask, theirs.grad * mask)
    assert mine.grad.abs().sum() > 0


def _token_rewards(rewards, mask):
    """verl's input: the outcome reward on each response's last token."""
    out = torch.zeros_like(mask)
    out[torch.arange(len(rewards)), mask.sum(-1).long() - 1] = rewards
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_advantages_equal_verl(seed):
    g = torch.Generator().manual_seed(seed)
    group_size, prompts = 4, 6
    rewards = torch.randint(0, 3, (group_size * prompts,), generator=g).float()
    _, _, _, _, mask = _random_batch(seed, rows=group_size * prompts)
    index = np.repeat(np.arange(prompts), group_size)
    lengths = mask.sum(-1)

    theirs, _ = verl_algos.compute_rloo_outcome_advantage(_token_rewards(rewards, mask), mask, index)
    _close(rloo_advantages(rewards, group_size)[:, None] * mask, theirs)

    theirs, _ = verl_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        _token_rewards(rewards, mask), mask, index)
    _close(reinforce_pp_advantages(rewards, lengths, group_size)[:, None] * mask, theirs)

    from types import SimpleNamespace
    theirs, _ = verl_algos.compute_reinforce_plus_plus_outcome_advantage(
        _token_rewards(rewards, mask), mask, config=SimpleNamespace(gamma=1.0))
    _close(reinforce_pp_advantages(rewards, lengths, group_size, group_baseline=False)[:, None] * mask, theirs)
