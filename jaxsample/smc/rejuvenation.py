"""Resample-move rejuvenation: MH suffix-resampling moves that keep π_t invariant.

After a resampling, duplicated particles are diversified by K Metropolis–Hastings moves on
the current intermediate target π_t ∝ p(y)^α exp(λ r(y)) · V_t(y) over the block's state
space (sequences that stopped within the block cap L, or have exactly L tokens). A move is
the power-sampling move of `jaxsample.mcmc`: cut at i ~ c(· | y), keep y_<i, regenerate
from q until a stop token or the same cap L. Its exact ratio (`jaxsample.mcmc.acceptance`:
power, proposal and cut terms over the full suffixes) gains the reward and value terms

    log r = α Σ_{t≥i} (ℓp'_t − ℓp_t) + Σ_{t≥i} (ℓq_t − ℓq'_t)
          + log c(i|y') − log c(i|y) + λ (r(y') − r(y)) + log V_hat(y') − log V_hat(y).

The reward does not factor over tokens, so it enters as the difference of the two full
prefixes' rewards. With a Monte Carlo lookahead V_hat(y') is a fresh estimate and V_hat(y)
the particle's stored one: the pseudo-marginal rule, which leaves the extended target
(sequence and its stored estimate) invariant. Finished particles move like the others (a
stopped sequence may become an unfinished one of length L and vice versa).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from jaxsample.decoding import (as_key_batch, extend, first_non_finite, prompt_row_keys, rewind, select_rows,
                                split_keys)
from jaxsample.lm import LanguageModel
from jaxsample.mcmc import CutLaw, Trace, log_acceptance_ratio
from jaxsample.rows import expand_groups
from jaxsample.sampling import Proposal
from jaxsample.smc.lookahead import LookaheadSpec, estimate_log_value
from jaxsample.smc.target import Particles, RewardTarget

Array = jax.Array


def move_log_ratio(
    target: RewardTarget, cut: Array, current: Particles, proposed: Particles, cut_law: CutLaw
) -> Array:
    """log r `[N]` of moving each particle from `current` to `proposed` after cutting at `cut`.

    `proposed` must share `current`'s tokens before `cut` (int32 `[N]`) and carry its own
    reward and log value. NaN (e.g. two `-inf` rewards) gives `-inf`: reject.
    """
    base = jax.vmap(partial(log_acceptance_ratio, cut_law=cut_law))(
        cut, expand_groups(target.alpha, cut.shape[0]), Trace.of(current.decode), Trace.of(proposed.decode)
    )
    # log_ratio sums α ℓp − ℓq per token: the power and proposal parts apart cancel in float32
    total = (
        base.log_ratio
        + target.log_potential_change(current.reward, proposed.reward)
        + (proposed.log_value - current.log_value)
    )
    return jnp.where(jnp.isnan(total), -jnp.inf, total)


def build_move(
    lm: LanguageModel,
    target: RewardTarget,
    proposal: Proposal,
    lookahead: LookaheadSpec,
    cut_law: CutLaw,
) -> Callable[..., tuple[Particles, Array, Array, Array]]:
    """Returns `move(key, particles, cap, moving=None) -> (particles, accepted, num_decoded,
    non_finite)`.

    Per particle: `accepted` bool `[N]`, `num_decoded` int32 `[N]` tokens of the proposal,
    `non_finite` int32 `[N]` the proposal's first generated position whose log p is not
    finite (NaN logits; such a move is rejected), −1 if none.

    `key` is one PRNG key, or P keys for particles that are P groups of N / P (prompt-major):
    each group then moves as it would alone with its key. `cap` (int32 scalar, traced) is
    the current block cap L; every particle must lie in its state space. `moving` (bool
    `[N]`, default all) selects the particles that move; the others stay as they are and
    decode nothing. Memory: the proposal is a second copy of every particle's decode state
    (its own cache included; the prompt cache is shared) until the accept/reject selects
    per row.
    """

    def move(key, particles: Particles, cap, moving=None):
        group_keys = as_key_batch(key)
        num_groups = group_keys.shape[0]
        cut_keys, regenerate_keys, value_keys, accept_keys = split_keys(group_keys, 4)
        current = particles.decode
        group_size = current.length.shape[0] // num_groups
        by_group = lambda x: x.reshape(num_groups, group_size, *x.shape[1:])  # noqa: E731
        log_c = jax.vmap(lambda trace: trace.cut_log_probs(cut_law))(Trace.of(current))
        cut = jax.vmap(partial(jax.random.categorical, axis=-1))(cut_keys, by_group(log_c))
        cut = cut.reshape(-1).astype(jnp.int32)
        # An empty particle (none exist after the first block) rewinds to itself: a no-op.
        movable = current.length > 0
        if moving is not None:
            movable = movable & moving
        cut = jnp.where(movable, cut, current.length)
        decode = rewind(lm, current, cut)
        decode, decoded = extend(
            prompt_row_keys(regenerate_keys, group_size), lm, decode,
            jnp.where(movable, cap, current.length), proposal,
        )
        reward = target.reward(decode)
        log_value, value_decoded = estimate_log_value(
            value_keys, lm, decode, reward, target, proposal, lookahead
        )
        proposed = Particles(decode, reward, log_value)
        log_r = move_log_ratio(target, cut, particles, proposed, cut_law)
        uniforms = jax.vmap(lambda k: jax.random.uniform(k, (group_size,), jnp.float32))(accept_keys)
        accepted = movable & (jnp.log(uniforms.reshape(-1)) < log_r)
        moved = Particles(
            decode=select_rows(accepted, decode, current),
            reward=jnp.where(accepted, reward, particles.reward),
            log_value=jnp.where(accepted, log_value, particles.log_value),
        )
        non_finite = jnp.where(movable, first_non_finite(decode.log_p, decode.length), -1)
        if moving is not None:
            value_decoded = jnp.where(moving, value_decoded, 0)
        return moved, accepted, decoded + value_decoded, non_finite

    return move
