"""Rule-based rewards: answer extraction, the R1-Zero format check, math-verify accuracy, and their weighted sum."""

from r1.rewards.extract import extract_answer
from r1.rewards.format import format_reward
from r1.rewards.registry import RewardResult, RuleReward, build_reward
from r1.rewards.verifier import VerifierPool

__all__ = ["RewardResult", "RuleReward", "VerifierPool", "build_reward", "extract_answer", "format_reward"]
