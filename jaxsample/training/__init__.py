"""Reward learning and reinforcement learning on verifiable rewards: GRPO, CoDistill-GRPO, CausalRM.

`grpo` holds the pure GRPO losses (group advantages, KL estimators, the clipped loss and its
aggregation modes); `codistill` the CoDistill-GRPO reconstruction (KD reward, truncated
importance weights, the small- and large-model losses); `trainer` and `codistill_trainer`
the training loops (rollout from the decode loop, host grading, one jitted μ-epoch update,
orbax checkpoints); `rewards` the task graders as reward functions; `sft` a warm-up;
`causalrm` reward models from selection-biased, label-flipped observational feedback.

    step = grpo_step_fn(lm, GRPOConfig(group_size=8), optax.adam(1e-5), prompt_fn, reward_fn)
    state = fit(step, init(lm, optax.adam(1e-5)), key, num_steps=100, checkpoint_dir="ckpt")
"""

from jaxsample.training import causalrm
from jaxsample.training import rewards
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
from jaxsample.training.codistill_trainer import (
    CoDistillConfig,
    CoDistillInfo,
    CoDistillState,
    codistill_update,
    codistill_step_fn,
    score_large,
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
from jaxsample.training.sft import sft_batch, sft_update
from jaxsample.training.trainer import (
    Checkpointer,
    GRPOConfig,
    Rollout,
    TrainState,
    UpdateInfo,
    grpo_update,
    fit,
    grpo_step_fn,
    init,
    optimize,
    pad_prompts,
    policy_model,
    rollout,
    sample_and_grade,
    score_rollout,
)

__all__ = [
    "causalrm",
    "Checkpointer",
    "CoDistillConfig",
    "CoDistillInfo",
    "CoDistillState",
    "GRPOConfig",
    "Rollout",
    "TrainState",
    "UpdateInfo",
    "codistill_update",
    "grpo_update",
    "codistill_step_fn",
    "fit",
    "grpo_step_fn",
    "init",
    "optimize",
    "pad_prompts",
    "policy_model",
    "rewards",
    "rollout",
    "sample_and_grade",
    "score_large",
    "score_rollout",
    "sft_batch",
    "sft_update",
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
