"""Future-value estimates for lookahead SMC.

The lookahead intermediate target is π_t ∝ γ_t · V_t with the exact future value

    V_t(y_{1:t}) = Σ_{completions y ⊒ y_{1:t}} p(y_{t+1:})^α exp(λ (r(y) − r(y_{1:t}))),

and V = 1 once a particle is finished (stop token or `max_new_tokens`). With the exact V
each π_t is the t-token marginal of π. Any positive estimate V_hat keeps SMC exact as long
as the value stored with a particle is the one divided out at its next increment (the
weights telescope to γ_T / Π q), so the stored log V_hat travels with the particle and is
never re-estimated. A prefix whose potential λ r is −inf (a broken hard constraint) has
weight 0 whatever V is; it stores log V_hat = 0, like a finished one.

A lookahead is either
- `Lookahead(num_rollouts=M, horizon=h)`: V_hat = mean over M rollouts of h tokens from the
  proposal q of Π (p^α G / q) along the rollout; a rollout that stops or reaches
  `max_new_tokens` contributes its exact remainder (1), a rollout cut at h tokens counts the
  remainder as 1. When every rollout's ratio is 0 (each broke a hard constraint), V_hat is
  1/(M + 1) of the rollouts' mean ratio without the reward change: V_hat = 0 would end a
  particle whose own future may still hold mass and bias Z_hat low. Costs up to N·M·h
  decoded tokens per evaluation and, while it runs, M copies of every particle's own
  (generated) cache.
- a function `log_value_fn(tokens int32 [S], length int32 []) -> f32 []`: a deterministic
  log V (an exact value in tests, or a learned value model).
- `ProposalTwist()`: twisted SMC (Zhao et al. 2024). V_hat(y_{1:t}) = ψ_t(y_{1:t}), the twist
  of the proposal's `Twist` at the last token, recorded when that token was sampled
  (`DecodeState.log_twist`). With the twist-induced proposal q ∝ p ψ the increment of a token
  is then log N_ψ(y_<t) − log ψ_{t−1}(y_<t), which does not depend on the token drawn.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from jaxsample.decoding import DecodeState, as_key_batch, extend, prompt_row_keys
from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.rows import gather_rows
from jaxsample.sampling import Proposal
from jaxsample.smc.target import RewardTarget
from jaxsample.validation import check_int

Array = jax.Array
LogValueFn = Callable[[Array, Array], Array]


class Lookahead(NamedTuple):
    """Monte Carlo future value from short rollouts (static configuration).

    Attributes:
      num_rollouts: M ≥ 1 rollouts per particle.
      horizon: h ≥ 1 tokens per rollout.
    """

    num_rollouts: int = 4
    horizon: int = 8


class ProposalTwist(NamedTuple):
    """The intermediate value is the proposal's own twist ψ (twisted SMC); no configuration."""


LookaheadSpec = Union[Lookahead, ProposalTwist, LogValueFn, None]


def check_lookahead(lookahead: LookaheadSpec) -> None:
    """Raises `ArgumentError` unless `lookahead` is None, a valid `Lookahead` or a function."""
    if lookahead is None or isinstance(lookahead, ProposalTwist):
        return
    if callable(lookahead) and not isinstance(lookahead, tuple):
        return
    if not isinstance(lookahead, Lookahead):
        raise ArgumentError(
            "lookahead must be None, a Lookahead(num_rollouts, horizon), ProposalTwist() or a "
            "log_value_fn, "
            f"got {lookahead!r}"
        )
    for name in ("num_rollouts", "horizon"):
        check_int(f"Lookahead.{name}", getattr(lookahead, name), 1)


def finished(decode: DecodeState) -> Array:
    """bool `[B]`: the row stopped or filled all `max_new_tokens` slots (V = 1 from here)."""
    return decode.done | (decode.length >= decode.tokens.shape[1])


def estimate_log_value(
    key: Array,
    lm: LanguageModel,
    decode: DecodeState,
    reward: Array,
    target: RewardTarget,
    proposal: Proposal,
    lookahead: LookaheadSpec,
) -> tuple[Array, Array]:
    """log V_hat of every row's current prefix.

    Args:
      key: PRNG key for the rollouts, or P keys for rows that are P groups of B / P
        (prompt-major): group p's rollouts draw what they would in a run of its rows alone.
      lm: the model.
      decode: the particles' decode state (B rows).
      reward: f32 `[B]`, r of each row's current prefix.
      target: the target (α, λ, reward function).
      proposal: the rollout distribution q (the SMC proposal).
      lookahead: see the module docstring; `None` gives log V = 0.
    Returns:
      `(log_value f32 [B], num_decoded int32 [B])`; log_value is 0 for finished rows and for
      rows whose log-potential λ r is −inf (weight 0).
    """
    batch = decode.length.shape[0]
    done = finished(decode)
    # Where λ r = −inf the particle's weight is 0 whatever V is; storing 0 there, as for a
    # finished row, keeps −inf − (−inf) = NaN out of the rollout ratios and the increments.
    settled = done | jnp.isneginf(target.log_potential(reward))
    if lookahead is None:
        return jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32)
    if isinstance(lookahead, ProposalTwist):
        if decode.log_twist is None or proposal.twist is None:
            raise ArgumentError("ProposalTwist() needs a twisted proposal and record_twist=True")
        last = jnp.take_along_axis(decode.log_twist, jnp.maximum(decode.length - 1, 0)[:, None], 1)
        log_value = jnp.where(decode.length > 0, last[:, 0], 0.0)
        return jnp.where(settled, 0.0, log_value), jnp.zeros((batch,), jnp.int32)
    if not isinstance(lookahead, Lookahead):
        log_value = jnp.asarray(jax.vmap(lookahead)(decode.tokens, decode.length), jnp.float32)
        if log_value.shape != (batch,):
            raise ArgumentError(
                f"log_value_fn must return one scalar per sequence, got shape {log_value.shape}"
            )
        return jnp.where(settled, 0.0, log_value), jnp.zeros((batch,), jnp.int32)

    num_rollouts, horizon = lookahead
    group_keys = as_key_batch(key)
    rollout_keys = prompt_row_keys(group_keys, batch * num_rollouts // group_keys.shape[0])
    # A row's M copies are consecutive, so every group of rows keeps its shared prompt.
    rows = jnp.repeat(jnp.arange(batch), num_rollouts)
    start = gather_rows(decode, rows)
    rollout, decoded = extend(rollout_keys, lm, start, start.length + horizon, proposal)
    log_base = target.log_weight(rollout.log_p, rollout.log_q, start.length, rollout.length)
    log_ratio = log_base + target.log_potential_change(reward[rows], target.reward(rollout))
    log_mean = lambda x: (  # noqa: E731
        jax.nn.logsumexp(x.reshape(batch, num_rollouts), axis=1) - jnp.log(jnp.float32(num_rollouts))
    )
    log_value = log_mean(log_ratio)
    # Every rollout broke a hard constraint (ratio 0). V_hat = 0 would kill a particle whose
    # future may still hold mass, biasing Z_hat low, while any V_hat > 0 keeps SMC exact: take
    # 1/(M + 1) of the rollouts' mean ratio without the reward, below what one success gives.
    fallback = log_mean(log_base) - jnp.log(jnp.float32(num_rollouts + 1))
    log_value = jnp.where(jnp.isneginf(log_value), fallback, log_value)
    decoded = jnp.sum(decoded.reshape(batch, num_rollouts), axis=1)
    return jnp.where(settled, 0.0, log_value), jnp.where(done, 0, decoded)
