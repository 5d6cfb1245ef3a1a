"""GRPO's pure functions against hand-computed cases."""

import math

import pytest
import torch

from r1.algo import (
    GRPOLoss,
    aggregate,
    filter_uniform_groups,
    group_advantages,
    kl_estimate,
    kl_shaped_rewards,
    policy_loss,
)
from r1.types import TrainBatch


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, 0.5774
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # a uniform group has no signal


def test_group_advantages_dr_grpo_only_centres():
    adv = group_advantages(torch.tensor([3.0, 1.0, 0.0, 0.0]), 2, std_normalize=False)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_filter_uniform_groups():
    keep = filter_uniform_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2)
    assert keep.tolist() == [False, True, False]


def test_kl_estimators_match_formulas():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    lr = ref - logp  # [-0.5, 1.0]
    assert torch.allclose(kl_estimate(logp, ref, "k1"), -lr)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * lr**2)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.exp(lr) - lr - 1)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_estimate(logp, logp, "k3"), torch.zeros(2))
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k4")


def test_k3_is_unbiased_for_the_true_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.5, 0.3, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True)
    est = kl_estimate(p.log()[x], q.log()[x], "k3").mean()
    true = (p * (p / q).log()).sum()
    assert abs(float(est - true)) < 0.01


def test_kl_gradient_flows_only_through_logp():
    logp = torch.tensor([-1.0], requires_grad=True)
    ref = torch.tensor([-2.0], requires_grad=True)
    kl_estimate(logp, ref, "k3").sum().backward()
    assert logp.grad is not None and ref.grad is None


def test_kl_shaped_rewards_subtract_sequence_kl():
    logp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    out = kl_shaped_rewards(torch.tensor([1.0]), logp, ref, mask, coef=0.1, kind="k1")
    assert torch.allclose(out, torch.tensor([1.0 - 0.1 * (1.0 + 2.0)]))


def test_aggregations_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(10.0 / 4)
    assert aggregate(values, mask, "seq_mean_token_sum_norm").item() == pytest.approx((6.0 / 4 + 4.0 / 4) / 2)
    assert aggregate(values, mask, "seq_mean_token_sum_norm", norm_constant=2).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(values, mask, "sum")


def test_policy_loss_on_policy_equals_minus_advantage():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-2.0)
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A, averaged over 2 tokens
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    # positive advantage: ratio capped at 1 + clip_high
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), clip_low=0.2, clip_high=0.2)
    per_token = [-1.2, -0.5, -1.1]  # max(-A r, -A clip(r))
    assert loss.item() == pytest.approx(sum(per_token) / 3, rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    assert stats["ratio_max"] == pytest.approx(1.5)
    # negative advantage: the clipped branch is pessimistic at low ratios
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 3), clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3, rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)


def test_clip_higher_is_asymmetric():
    old = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.25]]))
    loss_sym, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_high=0.2)
    loss_dapo, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_high=0.28)
    assert loss_sym.item() == pytest.approx(-1.2) and loss_dapo.item() == pytest.approx(-1.25)


def test_padding_never_counts():
    logp = torch.tensor([[-1.0, -1.0, 123.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = policy_loss(logp, torch.full((1, 3), -1.0), torch.tensor([1.0]), mask)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert logp.grad[0, 2] == 0


def test_policy_loss_gradients_only_through_logp():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    old = torch.tensor([[-1.2]], requires_grad=True)
    adv = torch.tensor([1.0], requires_grad=True)
    loss, _ = policy_loss(logp, old, adv, torch.ones(1, 1))
    loss.backward()
    assert logp.grad is not None and old.grad is None and adv.grad is None


def test_entropy_stat_is_masked_mean():
    _, stats = policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]),
                           entropy=torch.tensor([[0.5, 9.0]]))
    assert stats["entropy"] == pytest.approx(0.5)


def test_grpo_loss_adds_kl_and_reports_units():
    batch = TrainBatch(
        input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long),
        response_mask=torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]), advantages=torch.tensor([1.0, -1.0]),
        ref_logprobs=torch.full((2, 3), -2.0),
    )
    logp = torch.full((2, 3), -1.0)
    no_kl, _ = GRPOLoss(kl_coef=0.0)(logp, batch, None)
    with_kl, stats = GRPOLoss(kl_coef=0.5, kl_kind="k3")(logp, batch, None)
    k3 = math.exp(-1.0) + 1.0 - 1.0
    assert with_kl.item() == pytest.approx(no_kl.item() + 0.5 * k3, rel=1e-5)
    assert stats["kl"] == pytest.approx(k3, rel=1e-5)
    assert GRPOLoss(agg="token_mean").units(batch) == 3.0
    assert GRPOLoss(agg="seq_mean_token_mean").units(batch) == 2.0
