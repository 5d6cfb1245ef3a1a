"""Truncated importance weights against the rollout policy (async GRPO's off-policy correction), by hand."""

import math

import torch

from r1.algo import GRPOLoss, policy_loss, truncated_is_weights
from r1.types import TrainBatch


def test_weights_are_the_truncated_ratio_on_the_mask():
    old = torch.log(torch.tensor([[0.5, 0.4, 0.9, 0.3]]))
    mu = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, stats = truncated_is_weights(old, mu, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 2.0, 0.0]]))  # 0.4/0.1=4 -> 2, 0.9/0.3=3 -> 2; pad -> 0
    assert math.isclose(stats["is_weight_mean"], (1 + 4 + 3) / 3, rel_tol=1e-5)
    assert math.isclose(stats["is_weight_max"], 4.0, rel_tol=1e-5)
    assert math.isclose(stats["is_clipped_fraction"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(stats["is_log_ratio_abs_mean"], (0 + math.log(4) + math.log(3)) / 3, rel_tol=1e-5)


def test_weights_below_one_are_kept_and_carry_no_gradient():
    old = torch.log(torch.tensor([[0.2]])).requires_grad_()
    w, _ = truncated_is_weights(old, torch.log(torch.tensor([[0.8]])), torch.ones(1, 1), cap=2.0)
    assert torch.allclose(w, torch.tensor([[0.25]])) and not w.requires_grad


def test_policy_loss_scales_each_token_by_its_weight():
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    w = torch.tensor([[2.0, 0.5]])
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, agg="token_mean", is_weights=w)
    loss.backward()
    # on-policy ratio 1: per-token loss is -A * w, gradient -A * w / num_tokens
    assert math.isclose(loss.item(), -(2.0 + 0.5) / 2, rel_tol=1e-6)
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -0.25]]))


def _batch(rollout_logprobs):
    ids = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    return TrainBatch(ids, torch.ones_like(ids), mask, torch.tensor([1.0, -1.0]), rollout_logprobs=rollout_logprobs)


def test_grpo_loss_applies_is_only_when_configured_and_reports_it_always():
    logp = torch.full((2, 3), -1.0)
    batch = _batch(torch.full((2, 3), -1.0 - math.log(3.0)))  # pi_old / mu = 3 everywhere
    batch.old_logprobs = logp.clone()
    batch.advantages = torch.tensor([1.0, 1.0])
    _, plain = GRPOLoss(agg="token_mean")(logp, batch, None)
    _, corrected = GRPOLoss(agg="token_mean", is_level="token", is_cap=2.0)(logp, batch, None)
    assert math.isclose(plain["is_weight_mean"], 3.0, rel_tol=1e-5)  # (measured either way: the canary reads it)
    assert math.isclose(corrected["is_weight_mean"], 3.0, rel_tol=1e-5) and corrected["is_clipped_fraction"] == 1.0
    # every weight is truncated to the cap: the loss doubles
    plain_loss, _ = GRPOLoss(agg="token_mean")(logp, batch, None)
    corrected_loss, _ = GRPOLoss(agg="token_mean", is_level="token", is_cap=2.0)(logp, batch, None)
    assert math.isclose(corrected_loss.item(), 2.0 * plain_loss.item(), rel_tol=1e-6)


def test_matching_engines_make_the_correction_an_identity():
    logp = torch.randn(2, 3)
    batch = _batch(logp.clone())
    batch.old_logprobs = logp.clone()
    a, _ = GRPOLoss(is_level="token", is_cap=2.0)(logp, batch, None)
    b, _ = GRPOLoss()(logp, batch, None)
    assert torch.equal(a, b)
