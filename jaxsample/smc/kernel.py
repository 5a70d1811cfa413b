"""Reward-guided SMC decoding, one block per step: `init` and `build_kernel`.

One step appends a block of B tokens to every unfinished particle, adds the block's summed
incremental log-weight

    α Σ log p − Σ log q + λ (r_t − r_{t−1}) + log V_hat_t − log V_hat_{t−1}

(the last two only with a lookahead; V_hat_{t−1} is the value stored with the particle),
resamples when ESS < κ N (resetting every log-weight to LSE − log N, so that
log Z_hat = LSE(lw) − log N at any time), and after a resampling runs K MH rejuvenation
moves. Finished particles (stop token or `max_new_tokens`) are frozen: they decode nothing
and their increments are exactly 0. Block k (0-based) caps every particle at
L_k = min((k + 1) B, max_new_tokens) generated tokens, so all unfinished particles share
one length.

Precision: the running log-weights are a compensated float32 pair (`SMCState.log_weights`
and its `log_weight_residual`), and the ESS, resampling and log Z_hat's increments use them
less their maximum. A large offset that enters the weights and leaves them later (a
constant C in every log V_hat or twist) thus no longer rounds the increments in between at
ulp(C)/2 (0.004 at C = 1e5, 0.5 at 1e7). What stays is the float32 rounding of each value
itself: a log V_hat, log ψ or λ r of size C resolves its variation only to ulp(C)/2.

Memory: the particles share one copy of the prompt's KV cache; each owns the generated part
of its decode state. A resampling gathers the per-particle arrays, the cache in place (a
slice at a time; no slice when no particle moves), outside any `lax.cond`, which XLA:GPU
would make hold the cache twice. A Monte Carlo lookahead holds M extra copies of the
generated part while its rollouts run, and a rejuvenation move one extra copy.

    target = make_target(alpha, lam, reward_fn)
    state = init(lm, prompt, num_particles=64, max_new_tokens=256)
    step = jax.jit(build_kernel(lm, Proposal(1 / alpha), target, block_size=16))
    state, info = step(key, state)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.decoding import (as_key_batch, extend, first_non_finite, init_decode, is_key_batch, prompt_row_keys,
                                split_keys)
from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.mcmc import CutLaw, uniform
from jaxsample.sampling import Proposal
from jaxsample.validation import check_int, check_real
from jaxsample.smc.lookahead import LookaheadSpec, check_lookahead, estimate_log_value, finished
from jaxsample.smc.rejuvenation import build_move
from jaxsample.smc.resampling import Resampler, conditional_multinomial, get_resampler, multinomial
from jaxsample.smc.target import Particles, RewardTarget
from jaxsample.smc.weights import add_log_weights, centered, log_evidence, resample_if_needed, two_sum

Array = jax.Array


class SMCState(NamedTuple):
    """N particles of reward-guided SMC decoding (P·N of P prompts: rows prompt-major).

    Attributes:
      particles: per-particle decode state, reward and stored log value (`Particles`).
      log_weights: f32 `[N]` unnormalised log-weights; log Z_hat = LSE − log N (over each
        prompt's N).
      step: int32 `[]` blocks done.
      log_weight_residual: f32 `[N]` the rounding error of `log_weights`: the running
        log-weight is `log_weights + log_weight_residual` (`weights.add_log_weights`), so an
        increment smaller than half an ulp of `log_weights` is kept, not rounded away.
    """

    particles: Particles
    log_weights: Array
    step: Array
    log_weight_residual: Array


class SMCInfo(NamedTuple):
    """What one SMC step did: with P keys (P prompts' particles), every field gains a leading
    axis P, one entry per prompt.

    Attributes:
      ancestors: int32 `[N]` (`arange(N)` when not resampled), within the prompt's particles.
      ess: f32 `[]` ESS of the reweighted particles, before any resampling.
      resampled: bool `[]`.
      num_unique: int32 `[]` distinct ancestors (N when not resampled).
      log_z: f32 `[]` log Z_hat after the step.
      log_z_increment: f32 `[]` change of log Z_hat over the step (0 when both are -inf).
      acceptance_rate: f32 `[]` accepted fraction of the rejuvenation moves; NaN when none ran.
      num_decoded: int32 `[]` tokens sampled in the step: block extension, lookahead rollouts
        and rejuvenation proposals (accepted or not).
      all_zero: bool `[]` every log-weight is -inf (log Z_hat = -inf; nothing resampled).
      nan_or_inf: bool `[]` a log-weight is NaN or +inf (an error; `smc_decode` raises
        NumericalError).
      non_finite: int32 `[N]` (`[P, N]`) per particle, the first generated position whose log p is not
        finite (NaN logits) in its extension or in a rejuvenation proposal, −1 if none (an
        error; `smc_decode` raises NumericalError).
    """

    ancestors: Array
    ess: Array
    resampled: Array
    num_unique: Array
    log_z: Array
    log_z_increment: Array
    acceptance_rate: Array
    num_decoded: Array
    all_zero: Array
    nan_or_inf: Array
    non_finite: Array


def init(
    lm: LanguageModel,
    prompt_tokens: Array,
    num_particles: int,
    max_new_tokens: int,
    prompt_length: Array | int | None = None,
    record_twist: bool = False,
    record_features: bool = False,
) -> SMCState:
    """N empty particles of one prompt, or of each of P prompts (each prefilled once; its
    cache is shared by its particles).

    Args:
      lm: the model.
      prompt_tokens: int32 `[T]`, T ≥ 1, possibly right-padded (`jaxsample.decoding.pad_prompt`),
        or `[P, T]` (`pad_prompts`): P·N rows, prompt-major. Step them with P keys.
      num_particles: N, per prompt.
      max_new_tokens: S, generation slots per particle.
      prompt_length: the real prompt length of a padded prompt (default T; `[P]` for P
        prompts); may be traced.
      record_twist: keep per-token log ψ (needed with a twisted proposal).
      record_features: carry the model's hidden features (a twist head reads them).
    """
    num_rows = num_particles * (prompt_tokens.shape[0] if jnp.ndim(prompt_tokens) == 2 else 1)
    decode = init_decode(
        lm, prompt_tokens, num_rows, max_new_tokens, prompt_lengths=prompt_length,
        record_twist=record_twist, record_features=record_features,
    )
    zeros = jnp.zeros((num_rows,), jnp.float32)
    return SMCState(
        particles=Particles(decode=decode, reward=zeros, log_value=zeros),
        log_weights=zeros,
        step=jnp.zeros((), jnp.int32),
        log_weight_residual=zeros,
    )


def build_kernel(
    lm: LanguageModel,
    proposal: Proposal,
    target: RewardTarget,
    *,
    block_size: int,
    ess_threshold: float | Array = 0.5,
    resampler: str | Resampler = "systematic",
    num_rejuvenation_steps: int = 0,
    lookahead: LookaheadSpec = None,
    cut_law: CutLaw = uniform,
    conditional_sample: Array | None = None,
) -> Callable[[Array, SMCState], tuple[SMCState, SMCInfo]]:
    """Returns the pure `step(key, state) -> (state, info)` of block-wise SMC.

    With P keys, `state` holds P prompts' particles (`init` with `[P, T]` prompts) and each
    prompt's N particles are weighted, resampled and rejuvenated among themselves, drawing
    from that prompt's key what a state of its particles alone draws from it. A prompt
    whose particles have all finished no longer changes: its increments are 0, so its ESS
    stays what it was after its last step, which did not call for a resampling (the ESS of
    equal weights is exactly N), and nothing moves without one.

    Args:
      lm: the model.
      proposal: q, the token distribution sampled (its exact log q enters the weights).
      target: π ∝ p^α exp(λ r) (`make_target`).
      block_size: B, tokens per step (static).
      ess_threshold: κ; resample when ESS < κ N (traced).
      resampler: a `RESAMPLERS` name or a `(key, weights, N) -> ancestors` function (static).
      num_rejuvenation_steps: K MH moves after each resampling (static; 0 = none).
      lookahead: `None` (prefix-only), `Lookahead(M, h)` or a `log_value_fn` (static).
      cut_law: where rejuvenation moves cut (`jaxsample.mcmc` cut laws; default uniform).
      conditional_sample: `None`, or int32 `[S]` a reference sequence (pad after its stop
        token): conditional SMC. Particle 0 is clamped to it and keeps its own ancestry at
        every resampling; the other N − 1 ancestors are drawn i.i.d. from W (multinomial,
        the scheme whose conditional version is this simple; `resampler` must be
        "multinomial"). With an exact draw from π, E[log Z_hat] ≥ log Z. Not combinable with
        rejuvenation, which would move the reference.

    α, λ, κ, temperature and top-p are traced when `build_kernel` is called inside `jit`
    with traced arguments, so changing them does not recompile.
    """
    block_size = check_int("block_size", block_size, 1)
    num_rejuvenation_steps = check_int("num_rejuvenation_steps", num_rejuvenation_steps, 0)
    check_real("ess_threshold", ess_threshold, "[0, 1]")
    check_lookahead(lookahead)
    if conditional_sample is not None:
        if num_rejuvenation_steps:
            raise ArgumentError("conditional_sample cannot be combined with rejuvenation moves")
        if get_resampler(resampler) is not multinomial:
            raise ArgumentError(
                f"conditional SMC resamples multinomially; got resampler={resampler!r}"
            )
        resampler = conditional_multinomial
    resampler = get_resampler(resampler)
    move = build_move(lm, target, proposal, lookahead, cut_law)

    def rejuvenate(keys, particles, cap, moving):
        def one_move(carry, move_keys):
            particles, accepted, decoded, non_finite = carry
            particles, step_accepted, step_decoded, step_non_finite = move(move_keys, particles, cap, moving)
            non_finite = jnp.where(non_finite >= 0, non_finite, step_non_finite)
            return (particles, accepted + step_accepted, decoded + step_decoded, non_finite), None

        zero = jnp.zeros(particles.reward.shape, jnp.int32)
        (particles, accepted, decoded, non_finite), _ = jax.lax.scan(
            one_move, (particles, zero, zero, zero - 1), split_keys(keys, num_rejuvenation_steps)
        )
        return particles, accepted, decoded, non_finite

    def skip_rejuvenation(keys, particles, cap, moving):
        del keys, cap, moving
        zero = jnp.zeros(particles.reward.shape, jnp.int32)
        return particles, zero, zero, zero - 1

    def step(key: Array, state: SMCState) -> tuple[SMCState, SMCInfo]:
        group_keys = as_key_batch(key)
        num_groups, rows = group_keys.shape[0], state.log_weights.shape[0]
        if rows % num_groups:
            raise ArgumentError(f"{num_groups} keys for {rows} particles: each prompt's group needs one key")
        if conditional_sample is not None and num_groups > 1:
            raise ArgumentError("conditional SMC clamps one reference sequence: it takes one prompt's particles")
        group_size = rows // num_groups
        by_group = lambda x: x.reshape(num_groups, group_size)  # noqa: E731
        per_group = lambda x: jnp.sum(by_group(x), axis=1)  # noqa: E731
        extend_keys, value_keys, resample_keys, move_keys = split_keys(group_keys, 4)
        old = state.particles
        slots = old.decode.tokens.shape[1]
        cap = jnp.minimum((state.step + 1) * block_size, slots).astype(jnp.int32)
        frozen = finished(old.decode)
        forced = None
        if conditional_sample is not None:
            forced = jnp.full_like(old.decode.tokens, -1).at[0].set(conditional_sample)

        decode, decoded = extend(
            prompt_row_keys(extend_keys, group_size), lm, old.decode, cap, proposal, forced)
        reward = jnp.where(frozen, old.reward, target.reward(decode))
        log_value, value_decoded = estimate_log_value(
            value_keys, lm, decode, reward, target, proposal, lookahead
        )
        log_value = jnp.where(frozen, old.log_value, log_value)
        increments = (
            target.log_weight(decode.log_p, decode.log_q, old.decode.length, decode.length),
            target.log_potential_change(old.reward, reward),
            log_value - old.log_value,
        )
        # A dead particle stays dead: -inf + anything must not become NaN.
        unchanged = frozen | jnp.isneginf(state.log_weights)
        log_weights, residual = add_log_weights(
            state.log_weights, state.log_weight_residual,
            *(jnp.where(unchanged, 0.0, increment) for increment in increments),
        )

        # Resampling and log Z_hat see the weights less their group's common offset `top`.
        shifted, top = centered(by_group(log_weights), by_group(residual))
        particles = Particles(decode, reward, log_value)
        particles, shifted, resampling = resample_if_needed(
            resample_keys, shifted, particles, ess_threshold, resampler
        )
        reset, reset_residual = two_sum(top[:, None], shifted)
        resampled_rows = jnp.repeat(resampling.resampled, group_size)
        log_weights = jnp.where(resampled_rows, reset.reshape(-1), log_weights)
        residual = jnp.where(resampled_rows, reset_residual.reshape(-1), residual)
        extended_non_finite = first_non_finite(decode.log_p, decode.length)
        if num_rejuvenation_steps:
            particles, accepted, move_decoded, moved_non_finite = jax.lax.cond(
                jnp.any(resampling.resampled), rejuvenate, skip_rejuvenation,
                move_keys, particles, cap, resampled_rows,
            )
            total_moves = jnp.float32(num_rejuvenation_steps * group_size)
            acceptance_rate = jnp.where(resampling.resampled, per_group(accepted) / total_moves, jnp.nan)
        else:
            acceptance_rate = jnp.full((num_groups,), jnp.nan, jnp.float32)
            moved_non_finite = jnp.full_like(extended_non_finite, -1)
            move_decoded = jnp.zeros_like(extended_non_finite)

        log_z_before = log_evidence(by_group(state.log_weights))
        log_z = log_evidence(by_group(log_weights))
        # From the centered weights: log_z - log_z_before would round at ulp(log_z).
        shifted_before, top_before = centered(by_group(state.log_weights), by_group(state.log_weight_residual))
        log_z_increment = jnp.where(
            jnp.isneginf(log_z) & jnp.isneginf(log_z_before), 0.0,
            (top - top_before) + (log_evidence(shifted) - log_evidence(shifted_before)),
        )
        info = SMCInfo(
            ancestors=resampling.ancestors,
            ess=resampling.ess,
            resampled=resampling.resampled,
            num_unique=resampling.num_unique,
            log_z=log_z,
            log_z_increment=log_z_increment,
            acceptance_rate=acceptance_rate,
            num_decoded=per_group(decoded + value_decoded + move_decoded),
            all_zero=resampling.all_zero,
            nan_or_inf=resampling.nan_or_inf,
            non_finite=by_group(jnp.where(extended_non_finite >= 0, extended_non_finite, moved_non_finite)),
        )
        if not is_key_batch(key):
            info = jax.tree.map(lambda x: x[0], info)
        return SMCState(particles, log_weights, state.step + 1, residual), info

    return step
