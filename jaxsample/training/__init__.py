"""Reinforcement learning on verifiable rewards: GRPO and CoDistill-GRPO.

`grpo` holds the pure GRPO losses (group advantages, KL estimators, the clipped loss and its
aggregation modes).
"""

from jaxsample.training.grpo import (
    ADVANTAGE_MODES,
    AGGREGATIONS,
    KL_KINDS,
    PolicyLossMetrics,
    group_advantages,
    k1_reward_to_go,
    kl_term,
    masked_mean,
    policy_loss,
    token_weights,
    zero_variance_fraction,
)

__all__ = [
    "ADVANTAGE_MODES",
    "AGGREGATIONS",
    "KL_KINDS",
    "PolicyLossMetrics",
    "group_advantages",
    "k1_reward_to_go",
    "kl_term",
    "masked_mean",
    "policy_loss",
    "token_weights",
    "zero_variance_fraction",
]
