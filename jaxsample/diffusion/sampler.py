"""Ancestral unmasking: the reverse process of the masked-diffusion LM, as one `lax.scan`.

Schedule (documented choice): K fixed steps; step k unmasks exactly n_k =
`config.unmask_counts[k]` positions, chosen uniformly at random among the still-masked ones
(a uniformly random unmasking order cut into K blocks), and fills each from the denoiser's
p_θ(x_0^i | x_t) independently. This is MDLM's ancestral sampler with the random number of
positions per step replaced by a fixed one (it equals MDLM's law when K = T: one position per
step in a uniformly random order). The position choice does not depend on θ, so the per-step
log-probability reported is that of the tokens given the positions.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.diffusion.model import MaskedDiffusionLM
from jaxsample.validation import check_int

Array = jax.Array


class UnmaskResult(NamedTuple):
    """S samples of ancestral unmasking in K steps.

    Attributes:
      tokens: int32 `[S, T]` clean sequences x_0.
      log_probs: f32 `[S, K]` at step k, Σ over the positions i unmasked then of
        log p_θ(x_0^i | x_t).
    """

    tokens: Array
    log_probs: Array


def all_masked(model: MaskedDiffusionLM, num_samples: int) -> Array:
    """x_T: int32 `[S, T]` of MASK."""
    return jnp.full((num_samples, model.config.seq_len), model.config.mask_id, jnp.int32)


def choose_positions(key: Array, masked: Array, count: Array) -> Array:
    """A uniformly random `count`-subset of the masked positions of each row.

    Args:
      masked: bool `[S, T]`; count: int32 `[]` (≤ the masked count of every row).
    Returns:
      bool `[S, T]`, True at the chosen positions.
    """
    scores = jnp.where(masked, jax.random.uniform(key, masked.shape, jnp.float32), 2.0)
    rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    return rank < count


def unmask_step(key: Array, model: MaskedDiffusionLM, tokens: Array, count: Array) -> tuple[Array, Array]:
    """One reverse step: (x_{t−1} int32 `[S, T]`, log-probability of the new tokens f32 `[S]`)."""
    position_key, token_key = jax.random.split(key)
    log_probs = model.log_probs(tokens)
    chosen = choose_positions(position_key, tokens == model.config.mask_id, count)
    drawn = jax.random.categorical(token_key, log_probs).astype(jnp.int32)
    drawn_log_probs = jnp.take_along_axis(log_probs, drawn[..., None], axis=-1)[..., 0]
    return jnp.where(chosen, drawn, tokens), jnp.sum(jnp.where(chosen, drawn_log_probs, 0.0), axis=-1)


@partial(jax.jit, static_argnames="num_samples")
def _unmask(key: Array, model: MaskedDiffusionLM, num_samples: int) -> UnmaskResult:
    counts = jnp.asarray(model.config.unmask_counts)
    keys = jax.random.split(key, counts.shape[0])

    def step(tokens, inputs):
        step_key, count = inputs
        return unmask_step(step_key, model, tokens, count)

    tokens, log_probs = jax.lax.scan(step, all_masked(model, num_samples), (keys, counts))
    return UnmaskResult(tokens, log_probs.T)


def unmask(key: Array, model: MaskedDiffusionLM, num_samples: int) -> UnmaskResult:
    """`num_samples` independent clean sequences from the model by ancestral unmasking."""
    return _unmask(key, model, check_int("num_samples", num_samples, 1))
