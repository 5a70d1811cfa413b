"""CoDistill-GRPO losses: a small and a large policy trained together on the small one's rollouts.

RECONSTRUCTION. CoDistill-GRPO (Kwon, Sun, Suresh, Jain, Kumar, arXiv 2605.08873) is known
only from its abstracts: a large and a small model train simultaneously; the small one gets an
on-policy knowledge-distillation reward from the large model's distribution; the large one is
updated on the small model's rollouts with importance reweighting. No code is public. The
concrete forms below are this library's reconstruction (spec training.md §2.2), not the
paper's verified recipe:

- KD reward per token k_t = sg[log π_L^old(o_t) − log π_S(o_t)]: its policy gradient under π_S
  is −∇KL(π_S ‖ π_L) per position (reverse-KL on-policy distillation, MiniLLM / GKD sense).
- It joins the task advantage at token level, Â_{i,t} = A_i + λ k_{i,t} (default; only A is
  group-normalised, so a group where every rollout failed still gets a signal), or at
  sequence level, r'_i = r_i + λ mean_t k_{i,t} followed by group normalisation.
- The large model's per-token term is w_{i,t} · min(ρ^L A_i, clip(ρ^L) A_i) with
  ρ^L = π_L / π_L^old (its own trust region) and the truncated behaviour correction
  w = sg[min(π_L^old / π_S^old, C)] per token, or a length-normalised sequence weight
  min(exp(mean_t log(π_L^old / π_S^old)), C) (GSPO-style; never the raw product over tokens).
  A_i comes from the small model's group: that baseline bias is accepted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.errors import ArgumentError
from jaxsample.training.grpo import (
    LOG_RATIO_CLAMP,
    PolicyLossMetrics,
    as_float,
    check_shape_of,
    group_advantages,
    masked_mean,
    policy_loss,
)
from jaxsample.validation import check_choice, check_real

Array = jax.Array

KD_COMBINES = ("token", "sequence")
WEIGHT_LEVELS = ("token", "sequence", "none")


class ImportanceWeightStats(NamedTuple):
    """Diagnostics of the large model's behaviour-correction weights (float32 scalars).

    Attributes:
      ess_fraction: (Σw)² / (n Σw²) over the n real tokens, in (0, 1]; 1 when all weights agree.
      capped_fraction: fraction of real tokens whose weight sits at the cap C.
      mean_weight: mean w over real tokens.
    """

    ess_fraction: Array
    capped_fraction: Array
    mean_weight: Array


def _token_log_probs(logp) -> Array:
    """`logp` as a float `[S, N]` array, the shape every per-token argument is checked against."""
    logp = as_float(logp)
    if logp.ndim != 2:
        raise ArgumentError(f"logp must have shape [S, N], got {logp.shape}")
    return logp


def kd_reward(logp_large: Array, logp_small: Array, mask: Array) -> Array:
    """The per-token distillation reward sg[log π_L(o_t) − log π_S(o_t)] (reconstruction).

    Args:
      logp_large: float `[S, N]` log π_L^old of the small model's sampled tokens.
      logp_small: float `[S, N]` log π_S of the same tokens.
      mask: `[S, N]` 1 on real generated tokens.

    Returns:
      float32 `[S, N]`, stop-gradiented, 0 on padding (whatever the log-probs hold there).
    """
    logp_large = as_float(logp_large)
    logp_small = check_shape_of("logp_small", logp_small, "logp_large", logp_large.shape)
    mask = check_shape_of("mask", mask, "logp_large", logp_large.shape)
    # where, not *: padding may hold log p = -inf in both models, and NaN * 0 = NaN.
    return jnp.where(mask > 0, jax.lax.stop_gradient(logp_large - logp_small), 0.0)


def small_model_advantages(
    rewards: Array,
    kd: Array,
    mask: Array,
    lam: float | Array,
    combine: str = "token",
    mode: str = "grpo",
    eps: float = 1e-6,
) -> Array:
    """Task advantages with the KD reward mixed in (reconstruction, see the module docstring).

    Args:
      rewards: float `[B, G]` task rewards.
      kd: float `[S, N]` (S = B·G, rows in group order) from `kd_reward`.
      mask: `[S, N]` 1 on real generated tokens.
      lam: λ ≥ 0, the KD weight (traced).
      combine: "token": A_i + λ k_{i,t}; "sequence": group-normalise r_i + λ mean_t k_{i,t}.
      mode, eps: passed to `group_advantages`.

    Returns:
      float32 `[S, N]` per-token advantages (0 on padding).
    """
    check_choice("combine", combine, KD_COMBINES)
    check_real("lam", lam, "[0, inf]")
    rewards = as_float(rewards)
    kd = as_float(kd)
    if kd.ndim != 2:
        raise ArgumentError(f"kd must have shape [S, N], got {kd.shape}")
    mask = check_shape_of("mask", mask, "kd", kd.shape)
    if kd.shape[0] != rewards.size:
        raise ArgumentError(f"kd has {kd.shape[0]} rows but rewards hold {rewards.size} completions {rewards.shape}")
    if combine == "token":
        advantages = group_advantages(rewards, mode, eps).reshape(-1, 1)
        return (advantages + lam * kd) * mask
    mean_kd = kd.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    shaped = rewards + lam * mean_kd.reshape(rewards.shape)
    return group_advantages(shaped, mode, eps).reshape(-1, 1) * mask


def importance_weights(
    logp_large_old: Array, logp_small_old: Array, mask: Array, cap: float | Array = 2.0, level: str = "token"
) -> Array:
    """Truncated behaviour-correction weights for the large model on the small one's samples.

    Reconstruction: w = sg[min(π_L^old / π_S^old, C)] per token ("token"), or the
    length-normalised sequence weight min(exp(mean_t log(π_L^old / π_S^old)), C) shared by the
    sequence's tokens ("sequence"), or w ≡ 1 ("none": no correction). `cap=inf` disables
    truncation. Truncation (TIS) trades variance for bias.

    Args:
      logp_large_old: float `[S, N]` log π_L^old of the sampled tokens (one teacher-forced pass).
      logp_small_old: float `[S, N]` log π_S^old recorded at sampling time.
      mask: `[S, N]` 1 on real generated tokens.
      cap: C > 0 (traced).
      level: one of `WEIGHT_LEVELS`.

    Returns:
      float32 `[S, N]`, stop-gradiented, 0 on padding (whatever the log-probs hold there).
    """
    check_choice("level", level, WEIGHT_LEVELS)
    check_real("cap", cap, "(0, inf]")
    logp_large_old = as_float(logp_large_old)
    logp_small_old = check_shape_of("logp_small_old", logp_small_old, "logp_large_old", logp_large_old.shape)
    mask = check_shape_of("mask", mask, "logp_large_old", logp_large_old.shape)
    if level == "none":
        return mask
    # where, not *: padding may hold log p = -inf in both models, and NaN * 0 = NaN.
    log_ratio = jnp.where(mask > 0, logp_large_old - logp_small_old, 0.0)
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if level == "sequence":
        log_ratio = jnp.broadcast_to(log_ratio.sum(axis=1, keepdims=True) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0), mask.shape)
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_ratio), cap)) * mask


def importance_weight_stats(weights: Array, mask: Array, cap: float | Array) -> ImportanceWeightStats:
    """ESS fraction, fraction at the cap and mean of `weights [S, N]` over the real tokens."""
    mask = as_float(mask)
    weights = as_float(weights) * mask
    count = jnp.maximum(mask.sum(), 1.0)
    ess = weights.sum() ** 2 / jnp.maximum(jnp.sum(weights**2), jnp.finfo(jnp.float32).tiny)
    return ImportanceWeightStats(
        ess_fraction=ess / count,
        capped_fraction=masked_mean((weights >= cap).astype(jnp.float32), mask),
        mean_weight=masked_mean(weights, mask),
    )


def small_loss(
    logp: Array,
    logp_old: Array | None,
    logp_large_old: Array,
    rewards: Array,
    mask: Array,
    *,
    lam: float | Array = 0.1,
    combine: str = "token",
    advantage_mode: str = "grpo",
    eps_std: float = 1e-6,
    **loss_kwargs,
) -> tuple[Array, tuple[PolicyLossMetrics, Array]]:
    """The small model's CoDistill loss (reconstruction): GRPO with the KD reward mixed in.

    Args:
      logp: float `[S, N]` log π_S (differentiated).
      logp_old: float `[S, N]` log π_S^old recorded at sampling, or None (on-policy).
      logp_large_old: float `[S, N]` log π_L^old of the same tokens.
      rewards: float `[B, G]` task rewards (S = B·G, rows in group order).
      mask: `[S, N]` 1 on real generated tokens.
      lam, combine: see `small_model_advantages`.
      advantage_mode, eps_std: see `group_advantages`.
      **loss_kwargs: `policy_loss` options (eps_low, eps_high, beta, kl_kind, aggregation,
        logp_ref, entropy).

    Returns:
      `(loss, (PolicyLossMetrics, mean KD reward per real token))`.
    """
    # Checked here so that errors name this function's arguments, not kd_reward's.
    logp = _token_log_probs(logp)
    logp_large_old = check_shape_of("logp_large_old", logp_large_old, "logp", logp.shape)
    mask = check_shape_of("mask", mask, "logp", logp.shape)
    kd = kd_reward(logp_large_old, logp, mask)
    advantages = small_model_advantages(rewards, kd, mask, lam, combine, advantage_mode, eps_std)
    logp_ref = loss_kwargs.pop("logp_ref", None)
    loss, metrics = policy_loss(logp, logp_old, logp_ref, advantages, mask, **loss_kwargs)
    return loss, (metrics, masked_mean(kd, mask))


def large_loss(
    logp: Array,
    logp_old: Array | None,
    logp_small_old: Array,
    advantages: Array,
    mask: Array,
    *,
    cap: float | Array = 2.0,
    level: str = "token",
    **loss_kwargs,
) -> tuple[Array, tuple[PolicyLossMetrics, ImportanceWeightStats]]:
    """The large model's loss on the small model's rollouts (reconstruction).

    Per token w · min(ρ^L A, clip(ρ^L) A) − β KL; since w > 0 this is the clipped GRPO term
    with advantage w·A, which is how it is computed (the KL term stays unweighted).

    Args:
      logp: float `[S, N]` log π_L (differentiated).
      logp_old: float `[S, N]` log π_L^old from the teacher-forced scoring pass, or None
        (on-policy in the large model's own trust region: ρ^L ≡ 1 in value).
      logp_small_old: float `[S, N]` log π_S^old of the behaviour policy.
      advantages: float `[S]` A_i from the small model's groups.
      mask: `[S, N]` 1 on real generated tokens.
      cap, level: see `importance_weights`.
      **loss_kwargs: `policy_loss` options (eps_low, eps_high, beta, kl_kind, aggregation,
        logp_ref, entropy).

    Returns:
      `(loss, (PolicyLossMetrics, ImportanceWeightStats))`.
    """
    # Checked here so that errors name this function's arguments, not importance_weights'.
    logp = _token_log_probs(logp)
    if logp_old is not None:
        logp_old = check_shape_of("logp_old", logp_old, "logp", logp.shape)
    logp_small_old = check_shape_of("logp_small_old", logp_small_old, "logp", logp.shape)
    mask = check_shape_of("mask", mask, "logp", logp.shape)
    advantages = as_float(advantages)
    if advantages.shape != logp.shape[:1]:
        raise ArgumentError(f"advantages must have shape [S] = {logp.shape[:1]}, got {advantages.shape}")
    behaviour = jax.lax.stop_gradient(logp if logp_old is None else logp_old)
    weights = importance_weights(behaviour, logp_small_old, mask, cap, level)
    logp_ref = loss_kwargs.pop("logp_ref", None)
    loss, metrics = policy_loss(logp, logp_old, logp_ref, weights * advantages[:, None], mask, **loss_kwargs)
    return loss, (metrics, importance_weight_stats(weights, mask, cap))
