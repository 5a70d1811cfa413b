"""Reward learning and reinforcement learning on verifiable rewards: GRPO, CoDistill-GRPO, CausalRM.

`grpo` holds the pure GRPO losses (group advantages, KL estimators, the clipped loss and its
aggregation modes); `codistill` the CoDistill-GRPO reconstruction (KD reward, truncated
importance weights, the small- and large-model losses); `causalrm` reward models from
selection-biased, label-flipped observational feedback.
"""

from jaxsample.training import causalrm
from jaxsample.training.codistill import (
    KD_COMBINES,
    WEIGHT_LEVELS,
    ImportanceWeightStats,
    importance_weight_stats,
    importance_weights,
    kd_reward,
    large_loss,
    small_loss,
    small_model_advantages,
)
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
    "causalrm",
    "ADVANTAGE_MODES",
    "AGGREGATIONS",
    "ImportanceWeightStats",
    "KD_COMBINES",
    "WEIGHT_LEVELS",
    "importance_weight_stats",
    "importance_weights",
    "kd_reward",
    "large_loss",
    "small_loss",
    "small_model_advantages",
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
