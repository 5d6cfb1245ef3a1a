"""GRPO and its variants (and the SFT loss of the R1 pipeline's supervised stages) as pure functions on tensors.

Nothing here imports an engine, a worker or Ray: the driver composes these functions into a loss that the train
engine calls without knowing what it computes (prime-rl style). Names and signatures are part of the public API:
other frameworks check their own implementations against them.
"""

from r1.algo.advantages import (
    filter_uniform_groups,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from r1.algo.grpo import GRPOLoss
from r1.algo.kl import kl_estimate, kl_shaped_rewards
from r1.algo.loss import AGGREGATIONS, POLICY_LOSSES, aggregate, cispo_loss, gspo_loss, policy_loss
from r1.algo.offpolicy import rollout_correction, truncated_is_weights
from r1.algo.sft import SFTLoss

__all__ = [
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "GRPOLoss",
    "SFTLoss",
    "aggregate",
    "cispo_loss",
    "filter_uniform_groups",
    "group_advantages",
    "gspo_loss",
    "kl_estimate",
    "kl_shaped_rewards",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "rollout_correction",
    "truncated_is_weights",
]
