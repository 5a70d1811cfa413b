"""GRPO losses as small pure functions: group advantages, KL estimators, the clipped loss.

Standard GRPO (DeepSeekMath, arXiv 2402.03300) with the DAPO (arXiv 2503.14476) and Dr. GRPO
(arXiv 2503.20783) variants of advantage scaling and loss aggregation. Shapes: S = B·G
completions (rows), N generated-token slots per completion; `mask [S, N]` is 1 on the
generated tokens a completion really holds (its stop token included) and 0 on padding.
Prompt tokens never appear: every per-token array is generation-relative, as the decode loop
records it. Log-probabilities are float32 (float64 inputs stay float64, for gradient checks).

    A = group_advantages(rewards.reshape(B, G)).reshape(S)
    loss, metrics = policy_loss(logp, logp_old, logp_ref, A, mask, beta=0.04, kl_kind="k3_ratio_loss")
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_choice, check_real

Array = jax.Array

ADVANTAGE_MODES = ("grpo", "dr_grpo", "batch_std")
KL_KINDS = ("none", "k1_reward", "k2_loss", "k3_loss", "k3_ratio_loss")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "constant")

# verl's numerical clamps on the log-ratio and on k3.
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


class PolicyLossMetrics(NamedTuple):
    """Diagnostics of one `policy_loss` evaluation (float32 scalars, masked token means).

    Attributes:
      clip_fraction: tokens where the clipped branch of the min is the active one.
      mean_ratio: mean of ρ = π_θ / π_old.
      approx_kl: k3 estimate of KL(π_old ‖ π_θ) on the tokens sampled from π_old:
        mean(ρ − 1 − log ρ) (PPO's "approx_kl").
      kl: mean of the reference-KL estimator of `kl_kind` (0 for "none").
      entropy: mean next-token entropy if given, else the Monte Carlo estimate mean(−log π_θ).
    """

    clip_fraction: Array
    mean_ratio: Array
    approx_kl: Array
    kl: Array
    entropy: Array


def as_float(x) -> Array:
    """`x` as a float array of at least float32 precision (float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_shape_of(name: str, value, reference: str, shape: tuple[int, ...]) -> Array:
    """`value` as a float array (see `as_float`); raises unless its shape is `shape`, that of `reference`.

    Per-token arrays that are off by one slot would otherwise broadcast silently or fail
    inside XLA without naming the argument.
    """
    value = as_float(value)
    if value.shape != tuple(shape):
        raise ArgumentError(f"{name} must have the shape {tuple(shape)} of {reference}, got {value.shape}")
    return value


def _as_rewards(rewards) -> Array:
    """`rewards` as a float `[B, G]` array with G ≥ 2; concrete rewards must be finite."""
    rewards = as_float(rewards)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ArgumentError(f"rewards must have shape [B, G] with G >= 2 completions per prompt, got {rewards.shape}")
    # One NaN (e.g. from a failing grader) would turn its whole group's advantages into NaN.
    check_real("rewards", rewards, "(-inf, inf)")
    return rewards


def group_advantages(rewards: Array, mode: str = "grpo", eps: float = 1e-6) -> Array:
    """Group-relative advantages A_i shared by every token of completion i.

    Args:
      rewards: float `[B, G]`, G ≥ 2 completions of each of B prompts, finite.
      mode: "grpo": (r − mean_g r) / (std_g r + eps) with the sample std (ddof 1, as TRL);
        "dr_grpo": r − mean_g r (no std scaling, which biases updates by difficulty);
        "batch_std": (r − mean_g r) / (std of all B·G rewards (ddof 1) + eps).
      eps: ε_std ≥ 0 added to the std.

    Returns:
      float32 `[B, G]`; a group of identical rewards gets A = 0 (see `zero_variance_fraction`).
    """
    check_choice("mode", mode, ADVANTAGE_MODES)
    rewards = _as_rewards(rewards)
    check_real("eps", eps, "[0, inf]")
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if mode == "dr_grpo":
        return centred
    if mode == "grpo":
        std = _sample_std(centred, axis=1)
        constant = _constant_groups(rewards)[:, None]
    else:
        std = _sample_std(rewards - rewards.mean(), axis=None)
        constant = jnp.all(rewards == rewards[0, 0])
    # Tested on the rewards, not on std == 0: float rounding can leave a tiny std that would
    # blow the zero advantages of identical rewards up to O(1) noise (and eps = 0 gives 0/0).
    return jnp.where(constant, 0.0, centred / jnp.where(constant, 1.0, std + eps))


def _sample_std(deviations: Array, axis) -> Array:
    """The ddof-1 std of mean-zero `deviations` along `axis` (kept as size 1), from the
    deviations scaled to [−1, 1]: their squares overflow float32 once |r| ≳ 1.8e19."""
    scale = jnp.max(jnp.abs(deviations), axis=axis, keepdims=True)
    scale = jnp.where(scale > 0, scale, 1.0)
    unit = deviations / scale
    count = unit.size if axis is None else unit.shape[axis]
    return scale * jnp.sqrt(jnp.sum(unit * unit, axis=axis, keepdims=True) / (count - 1))


def _constant_groups(rewards: Array) -> Array:
    """bool `[B]`: the groups (rows of `rewards [B, G]`) whose G rewards are all equal."""
    return jnp.all(rewards == rewards[:, :1], axis=1)


def zero_variance_fraction(rewards: Array) -> Array:
    """Fraction of the B groups (rows of `rewards [B, G]`, G ≥ 2) whose G rewards are all equal."""
    return jnp.mean(_constant_groups(_as_rewards(rewards)).astype(jnp.float32))


def kl_term(logp: Array, logp_ref: Array, logp_old: Array | None = None, kind: str = "k3_loss") -> Array:
    """Per-token estimator of KL(π_θ ‖ π_ref) at the sampled tokens (Schulman's k1/k2/k3).

    With d = clip(log π_ref − log π_θ, ±20):
    - "k1_reward": k1 = −d. Its value is unbiased on samples of π_θ but its gradient in a loss,
      ∇log π_θ, has expectation 0: it belongs in the reward (see `k1_reward_to_go`), never in
      the loss. This function returns k1 so that the value can be logged or shaped.
    - "k2_loss": d²/2. Biased value; E_{π_θ}[∇k2] = ∇KL(π_θ ‖ π_ref), the right gradient.
    - "k3_loss": clip(e^d − d − 1, ±10), GRPO's choice. Unbiased, low-variance value, but
      E_{π_θ}[∇k3] = −E_{π_ref}[∇log π_θ] = ∇KL(π_ref ‖ π_θ): the FORWARD KL's gradient, not the
      reverse KL the objective names (the known k3 bias: verl PR #2953, open-instruct #534).
    - "k3_ratio_loss": w·k3 with w = π_θ / π_old NOT stop-gradiented (DeepSeek-V3.2; TRL's
      `use_bias_correction_kl`): ∇(w·k3) = w (log π_θ − log π_ref) ∇log π_θ, so on samples of
      π_old its expectation is ∇KL(π_θ ‖ π_ref) — the bias-corrected form. Needs `logp_old`.
    - "none": zeros.

    Only the per-token conditional is differentiated: no token-level estimator reaches the
    prefix distribution (that needs k1 as a reward summed into returns).

    Args:
      logp: float `[...]` log π_θ of the sampled tokens (differentiable).
      logp_ref: float, the shape of `logp`: log π_ref (treated as a constant).
      logp_old: float, the shape of `logp`: log π_old of the sampling policy (constant); "k3_ratio_loss" only.
      kind: one of `KL_KINDS`.

    Returns:
      float32 `[...]`, the per-token penalty (0 where the inputs are padding zeros only if the
      caller masks it; `policy_loss` does).
    """
    check_choice("kind", kind, KL_KINDS)
    logp = as_float(logp)
    if kind == "none":
        return jnp.zeros_like(logp)
    logp_ref = check_shape_of("logp_ref", logp_ref, "logp", logp.shape)
    d = jnp.clip(jax.lax.stop_gradient(logp_ref) - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1_reward":
        return -d
    if kind == "k2_loss":
        return 0.5 * d**2
    k3 = jnp.clip(jnp.exp(d) - d - 1.0, -K3_CLAMP, K3_CLAMP)
    if kind == "k3_loss":
        return k3
    if logp_old is None:
        raise ArgumentError("kind 'k3_ratio_loss' needs logp_old (the sampling policy's log-probs)")
    logp_old = check_shape_of("logp_old", logp_old, "logp", logp.shape)
    log_w = jnp.clip(logp - jax.lax.stop_gradient(logp_old), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.exp(log_w) * k3


def k1_reward_to_go(logp: Array, logp_ref: Array, mask: Array) -> Array:
    """Σ_{t' ≥ t} k1_{t'} per token, stop-gradiented: the KL penalty as a per-token return.

    `policy_loss` with kl_kind "k1_reward" subtracts β times this from the advantages, which
    makes the policy gradient that of E[r − β Σ_t k1_t], the sequence-level KL(π_θ ‖ π_ref)
    penalty including the prefix distribution.

    Args:
      logp, logp_ref: float `[S, N]`.
      mask: `[S, N]` 1 on real generated tokens.

    Returns:
      float32 `[S, N]`, 0 on padding.
    """
    logp = as_float(logp)
    mask = check_shape_of("mask", mask, "logp", logp.shape)
    # where, not *: a padding slot holding log p = -inf gives k1 = NaN, and NaN * 0 = NaN.
    k1 = jnp.where(mask > 0, jax.lax.stop_gradient(kl_term(logp, logp_ref, kind="k1_reward")), 0.0)
    to_go = jnp.flip(jnp.cumsum(jnp.flip(k1, axis=-1), axis=-1), axis=-1)
    return to_go * mask


def token_weights(mask: Array, aggregation: str = "seq_mean_token_mean") -> Array:
    """Weight of each token's term in the loss (the loss is −Σ weight·ℓ).

    | aggregation           | weight            | used by                               |
    |-----------------------|-------------------|---------------------------------------|
    | "seq_mean_token_mean" | 1 / (S · |o_i|)    | DeepSeekMath; TRL "grpo"              |
    | "token_mean"          | 1 / Σ_i |o_i|      | DAPO; TRL "dapo"; verl; tunix         |
    | "constant"            | 1 / (S · L_max)    | Dr. GRPO (TRL / EasyDeL "dr_grpo")     |

    L_max is the generation budget N (the mask's width), a constant, so the constant mode does
    not depend on the lengths at all; seq_mean_token_mean penalises long wrong answers less per
    token (a length bias). Rows with no tokens get weight 0.

    Args:
      mask: `[S, N]` 1 on real generated tokens, 0 on padding.
      aggregation: one of `AGGREGATIONS`.

    Returns:
      float32 `[S, N]`, 0 where the mask is 0.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    mask = as_float(mask)
    if mask.ndim != 2:
        raise ArgumentError(f"mask must have shape [S, N], got {mask.shape}")
    rows, slots = mask.shape
    if aggregation == "seq_mean_token_mean":
        lengths = mask.sum(axis=1, keepdims=True)
        return mask / (rows * jnp.maximum(lengths, 1.0))
    if aggregation == "token_mean":
        return mask / jnp.maximum(mask.sum(), 1.0)
    return mask / (rows * slots)


def masked_mean(values: Array, mask: Array) -> Array:
    """Mean of `values` over the tokens where `mask` (the shape of `values`) is 1 (0 when it is empty).

    Values under mask 0 are never read, so a NaN or ±inf there (e.g. from a padding slot's
    log p = -inf) changes neither the mean nor its gradient.
    """
    mask = check_shape_of("mask", mask, "values", jnp.shape(values))
    return jnp.sum(jnp.where(mask > 0, values, 0.0)) / jnp.maximum(mask.sum(), 1.0)


def policy_loss(
    logp: Array,
    logp_old: Array | None,
    logp_ref: Array | None,
    advantages: Array,
    mask: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float | Array = 0.0,
    kl_kind: str = "none",
    aggregation: str = "seq_mean_token_mean",
    entropy: Array | None = None,
) -> tuple[Array, PolicyLossMetrics]:
    """The clipped GRPO loss −J with its diagnostics.

    Per token: ℓ = min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A) − β·KL, with
    ρ = exp(log π_θ − log π_old); the loss is −Σ_{i,t} weight_{i,t} ℓ_{i,t} with the weights of
    `token_weights(mask, aggregation)`. When `logp_old` is None the update is on-policy (μ = 1)
    and ρ = exp(logp − stop_gradient(logp)): 1 in value, A·∇log π_θ in gradient, so the
    gradient is exactly group-baselined REINFORCE. Log-probabilities under mask 0 are never
    read: a padding slot may hold log p = -inf (a pad token the model never emits).

    Args:
      logp: float `[S, N]` log π_θ of the sampled tokens (the differentiated argument).
      logp_old: float `[S, N]` log π_old recorded at sampling time, or None (on-policy).
      logp_ref: float `[S, N]` log π_ref, or None when kl_kind is "none".
      advantages: float `[S]` (one per completion) or `[S, N]` (per token, e.g. CoDistill).
      mask: `[S, N]` 1 on real generated tokens, 0 on padding.
      eps_low: ε_low in [0, 1).
      eps_high: ε_high ≥ 0 (DAPO's clip-higher: 0.28).
      beta: β ≥ 0, the KL weight (traced: changing it does not recompile).
      kl_kind: one of `KL_KINDS` (see `kl_term`); "k1_reward" shapes the advantages with
        −β·`k1_reward_to_go` instead of adding a loss term.
      aggregation: one of `AGGREGATIONS` (see `token_weights`).
      entropy: optional float `[S, N]` next-token entropies, for the metric only.

    Returns:
      `(loss float32 [], PolicyLossMetrics)`.
    """
    check_choice("kl_kind", kl_kind, KL_KINDS)
    check_real("eps_low", eps_low, "[0, 1)")
    check_real("eps_high", eps_high, "[0, inf]")
    check_real("beta", beta, "[0, inf]")
    logp = as_float(logp)
    if logp.ndim != 2 or jnp.shape(mask) != logp.shape:
        raise ArgumentError(f"logp and mask must both have shape [S, N], got {logp.shape} and {jnp.shape(mask)}")
    if kl_kind != "none" and logp_ref is None:
        raise ArgumentError(f"kl_kind {kl_kind!r} needs logp_ref")
    mask = as_float(mask)
    if logp_old is not None:
        logp_old = check_shape_of("logp_old", logp_old, "logp", logp.shape)
    if logp_ref is not None:
        logp_ref = check_shape_of("logp_ref", logp_ref, "logp", logp.shape)
    if entropy is not None:
        entropy = check_shape_of("entropy", entropy, "logp", logp.shape)
    # Padding slots are zeroed, not just weighted by 0: there log p may be -inf, and
    # -inf - (-inf) = NaN would reach the loss, its gradient and the metrics (NaN * 0 = NaN).
    # The where also passes a zero gradient, never a NaN one, back to those slots.
    real = mask > 0
    logp = jnp.where(real, logp, 0.0)
    logp_old, logp_ref = (None if x is None else jnp.where(real, x, 0.0) for x in (logp_old, logp_ref))
    advantages = as_float(advantages)
    if advantages.shape == logp.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ArgumentError(f"advantages must have shape [S] or [S, N] = {logp.shape}, got {advantages.shape}")
    old = jax.lax.stop_gradient(logp if logp_old is None else logp_old)
    log_ratio = jnp.clip(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    if kl_kind == "k1_reward":
        advantages = advantages - beta * k1_reward_to_go(logp, logp_ref, mask)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    surrogate = jnp.minimum(unclipped, clipped)
    kl = kl_term(logp, logp_ref, old, kl_kind) if kl_kind != "none" else jnp.zeros_like(logp)
    penalty = kl if kl_kind in ("k2_loss", "k3_loss", "k3_ratio_loss") else 0.0
    per_token = surrogate - beta * penalty
    loss = -jnp.sum(token_weights(mask, aggregation) * per_token)

    stopped_log_ratio = jax.lax.stop_gradient(log_ratio)
    metrics = PolicyLossMetrics(
        clip_fraction=masked_mean((clipped < unclipped).astype(jnp.float32), mask),
        mean_ratio=masked_mean(jnp.exp(stopped_log_ratio), mask),
        approx_kl=masked_mean(jnp.exp(stopped_log_ratio) - 1.0 - stopped_log_ratio, mask),
        kl=masked_mean(jax.lax.stop_gradient(kl), mask),
        entropy=masked_mean(jax.lax.stop_gradient(-logp if entropy is None else entropy), mask),
    )
    return loss, metrics
