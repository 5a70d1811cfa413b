"""The CoDistill-GRPO trainer (reconstruction; see `jaxsample.training.codistill`).

A small and a large policy train together from one batch per step:

1. rollout: G completions per prompt from the SMALL model only (log π_S^old recorded);
2. rewards from the task grader (host);
3. scoring: ONE teacher-forced pass of the large model over the same tokens gives log π_L^old
   (this replaces large-model generation — the likely source of the paper's speed-up);
4. one jitted update: μ epochs of the small model's loss (task advantage + λ·KD reward) and
   of the large model's importance-weighted loss on the small model's samples.

Reconstructed choices (the paper's text is unavailable): the large model never generates
during training; λ is constant (no annealing); both models share the clip range, KL settings
and μ of one `GRPOConfig`, each with a KL toward its own reference.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxsample.lm import LanguageModel
from jaxsample.training.codistill import KD_COMBINES, WEIGHT_LEVELS, ImportanceWeightStats, large_loss, small_loss
from jaxsample.training.grpo import group_advantages
from jaxsample.training.trainer import (
    GRPOConfig,
    Rollout,
    TrainState,
    UpdateInfo,
    loss_options,
    optimize,
    policy_model,
    reference_log_probs,
    sample_and_grade,
    score_rollout,
    update_info,
)
from jaxsample.validation import check_choice, check_real

Array = jax.Array


@struct.dataclass
class CoDistillConfig:
    """CoDistill-GRPO hyperparameters (floats traced).

    Attributes:
      grpo: the shared GRPO settings (group size, μ, clip, KL, aggregation, LoRA).
      lam: λ ≥ 0, weight of the small model's KD reward.
      cap: C > 0, truncation of the large model's importance weights (inf: none).
      combine: "token" (default) or "sequence" KD combination.
      weight_level: "token", "sequence" (length-normalised) or "none" (w ≡ 1).
    """

    grpo: GRPOConfig = GRPOConfig()
    lam: float = 0.1
    cap: float = 2.0
    combine: str = struct.field(pytree_node=False, default="token")
    weight_level: str = struct.field(pytree_node=False, default="token")

    def validated(self) -> "CoDistillConfig":
        """Checks every field (`grpo`'s too), raising `ArgumentError` naming the one out of range."""
        self.grpo.validated()
        check_real("lam", self.lam, "[0, inf]")
        check_real("cap", self.cap, "(0, inf]")
        check_choice("combine", self.combine, KD_COMBINES)
        check_choice("weight_level", self.weight_level, WEIGHT_LEVELS)
        return self


class CoDistillState(NamedTuple):
    """Both policies' training states, updated together by `codistill_update`; start from
    `CoDistillState(init(small_lm, optimizer), init(large_lm, optimizer))`.

    Attributes:
      small: `TrainState` of the small model π_S (the one that generates): trainable
        (params pytree or `LoraAdapters`), opt_state, step int32 `[]`.
      large: `TrainState` of the large model π_L (trained on π_S's samples), as `small`.
    """

    small: TrainState
    large: TrainState


class CoDistillInfo(NamedTuple):
    """Diagnostics of one `codistill_update` (per-epoch values averaged over the μ epochs).

    Attributes:
      small: `UpdateInfo` of the small model π_S.
      large: `UpdateInfo` of the large model π_L.
      kd_reward: float32 `[]` mean over real tokens of the KD reward
        log π_L^old − log π_S (`kd_reward`, a reconstruction).
      weights: `ImportanceWeightStats` of π_L's behaviour-correction weights, each field a
        float32 `[]`.
    """

    small: UpdateInfo
    large: UpdateInfo
    kd_reward: Array
    weights: ImportanceWeightStats


@jax.jit
def score_large(large_lm: LanguageModel, state: CoDistillState, config: CoDistillConfig, batch: Rollout) -> Array:
    """log π_L^old `[S, N]` of the small model's rollout: one teacher-forced forward."""
    return score_rollout(policy_model(large_lm, state.large.trainable, config.grpo.lora), batch)


@partial(jax.jit, static_argnames=("small_optimizer", "large_optimizer"))
def codistill_update(
    small_lm: LanguageModel,
    large_lm: LanguageModel,
    state: CoDistillState,
    config: CoDistillConfig,
    batch: Rollout,
    rewards: Array,
    logp_large_old: Array,
    small_optimizer: optax.GradientTransformation,
    large_optimizer: optax.GradientTransformation,
) -> tuple[CoDistillState, CoDistillInfo]:
    """Both models' μ-epoch updates from one small-model rollout, in one jitted function.

    Args:
      small_lm, large_lm: the frozen reference models.
      state: both training states.
      config: hyperparameters.
      batch: the small model's `Rollout` (its `logp_old` is log π_S^old).
      rewards: float `[B, G]`.
      logp_large_old: float `[S, N]` from `score_large`.
      small_optimizer, large_optimizer: static.
    """
    grpo = config.grpo
    rewards = jnp.asarray(rewards, jnp.float32)
    on_policy = grpo.num_epochs == 1
    small_ref = reference_log_probs(small_lm, grpo, batch)
    large_ref = reference_log_probs(large_lm, grpo, batch)
    advantages = group_advantages(rewards, grpo.advantage_mode, grpo.eps_std).reshape(-1)

    def small_fn(trainable):
        logp, entropy = score_rollout(policy_model(small_lm, trainable, grpo.lora), batch, with_entropy=True)
        return small_loss(
            logp, None if on_policy else batch.logp_old, logp_large_old, rewards, batch.mask, lam=config.lam,
            combine=config.combine, advantage_mode=grpo.advantage_mode, eps_std=grpo.eps_std,
            logp_ref=small_ref, entropy=entropy, **loss_options(grpo),
        )

    def large_fn(trainable):
        logp, entropy = score_rollout(policy_model(large_lm, trainable, grpo.lora), batch, with_entropy=True)
        return large_loss(
            logp, None if on_policy else logp_large_old, batch.logp_old, advantages, batch.mask, cap=config.cap,
            level=config.weight_level, logp_ref=large_ref, entropy=entropy, **loss_options(grpo),
        )

    small, (small_loss_history, (small_metrics, kd), small_norm) = optimize(small_optimizer, small_fn, state.small, grpo.num_epochs)
    large, (large_loss_history, (large_metrics, stats), large_norm) = optimize(large_optimizer, large_fn, state.large, grpo.num_epochs)
    info = CoDistillInfo(
        small=update_info(rewards, small_loss_history, small_metrics, small_norm),
        large=update_info(rewards, large_loss_history, large_metrics, large_norm),
        kd_reward=kd.mean(),
        weights=jax.tree.map(jnp.mean, stats),
    )
    return CoDistillState(small, large), info


def codistill_step_fn(
    small_lm: LanguageModel,
    large_lm: LanguageModel,
    config: CoDistillConfig,
    small_optimizer: optax.GradientTransformation,
    large_optimizer: optax.GradientTransformation,
    prompt_fn: Callable[[int], tuple[list, Any]],
    reward_fn: Callable[[Any, np.ndarray, np.ndarray], np.ndarray],
) -> Callable:
    """One CoDistill step for `fit` (arguments as `grpo_step_fn`, one model and optimizer per
    role). Metrics: the small model's reward and accuracy on its rollouts, both models' loss
    diagnostics (prefixed `small_` / `large_`), mean KD reward, importance-weight ESS fraction,
    capped fraction, tokens generated per model (the large model: 0) and wall time per phase."""
    config = config.validated()

    def step(key, state: CoDistillState, t: int):
        prompts, problems = prompt_fn(t)
        small = policy_model(small_lm, state.small.trainable, config.grpo.lora)
        batch, rewards, metrics = sample_and_grade(key, small, config.grpo, prompts, problems, reward_fn)
        started = time.perf_counter()
        logp_large_old = jax.block_until_ready(score_large(large_lm, state, config, batch))
        scored = time.perf_counter()
        state, info = jax.block_until_ready(
            codistill_update(small_lm, large_lm, state, config, batch, rewards, logp_large_old, small_optimizer, large_optimizer)
        )
        metrics.update(
            tokens_generated_small=metrics.pop("tokens_generated"),
            tokens_generated_large=0,
            tokens_scored_large=int(np.asarray(batch.lengths).sum()),
            seconds_score_large=scored - started,
            seconds_update=time.perf_counter() - scored,
            kd_reward=float(info.kd_reward),
            **{f"iw_{k}": float(v) for k, v in info.weights._asdict().items()},
            **{f"small_{k}": float(v) for k, v in info.small._asdict().items()},
            **{f"large_{k}": float(v) for k, v in info.large._asdict().items() if k not in ("reward", "zero_variance_fraction")},
        )
        metrics["reward"] = metrics.pop("small_reward")
        metrics["zero_variance_fraction"] = metrics.pop("small_zero_variance_fraction")
        return state, metrics

    return step
