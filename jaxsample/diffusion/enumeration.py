"""Exact laws of a tiny masked-diffusion model by enumerating every partially masked state.

A state x ∈ {0..V}^T (V = MASK) has index Σ_i x_i (V+1)^i. The step a state belongs to is
fixed by its number of masked positions, so a table over all (V+1)^T states holds both the
model's output law (forward recursion over the unmasking schedule) and the optimal twist
ψ*(x) = E[φ(x_0) | x] (backward recursion). Only for tiny configs (e.g. T = 4, V = 3:
256 states); larger ones raise `ConfigError`.
"""

from __future__ import annotations

import itertools
from math import comb

import jax
import jax.numpy as jnp
import numpy as np
import scipy

from jaxsample.diffusion.model import MaskedDiffusionLM
from jaxsample.errors import ConfigError, NumericalError
from jaxsample.testing.targets import Distribution

Array = jax.Array
_MAX_STATES = 1 << 16


def all_states(model: MaskedDiffusionLM) -> np.ndarray:
    """int32 `[(V+1)^T, T]`, row s the state of index s."""
    c = model.config
    if (c.vocab_size + 1) ** c.seq_len > _MAX_STATES:
        raise ConfigError(f"exact enumeration needs (V+1)^T <= {_MAX_STATES} states, got "
                          f"({c.vocab_size}+1)^{c.seq_len}")
    digits = np.arange((c.vocab_size + 1) ** c.seq_len)[:, None] // (c.vocab_size + 1) ** np.arange(c.seq_len)
    return (digits % (c.vocab_size + 1)).astype(np.int32)


def state_index(model: MaskedDiffusionLM, tokens: Array) -> Array:
    """int32 `[...]`, the index of each state `[..., T]`."""
    c = model.config
    return jnp.sum(tokens * (c.vocab_size + 1) ** jnp.arange(c.seq_len), axis=-1)


def _transitions(model: MaskedDiffusionLM):
    """Yields (state index, [(child index, probability)]) for every state with masks, from
    the unmasking schedule and the denoiser's probabilities (float64)."""
    c = model.config
    states = all_states(model)
    probs = np.exp(np.asarray(jax.jit(lambda m, x: m.log_probs(x))(model, jnp.asarray(states)), np.float64))
    counts = c.unmask_counts
    # Masked count m at the start of step k is T - sum(counts[:k]); it fixes the count unmasked.
    count_for_masked = {c.seq_len - int(counts[:k].sum()): int(counts[k]) for k in range(c.num_steps)}
    powers = (c.vocab_size + 1) ** np.arange(c.seq_len)
    for s, state in enumerate(states):
        masked = np.flatnonzero(state == c.mask_id)
        if masked.size not in count_for_masked:
            continue
        n = count_for_masked[masked.size]
        children = []
        for positions in itertools.combinations(masked, n):
            positions = list(positions)
            for values in itertools.product(range(c.vocab_size), repeat=n):
                p = np.prod(probs[s, positions, values]) / comb(masked.size, n)
                child = s + int(np.sum((np.asarray(values) - c.mask_id) * powers[positions]))
                children.append((child, p))
        yield s, children


def _clean_states(model: MaskedDiffusionLM) -> np.ndarray:
    states = all_states(model)
    return np.flatnonzero(np.all(states != model.config.mask_id, axis=-1))


def model_law(model: MaskedDiffusionLM) -> Distribution:
    """The exact law of `unmask`'s output over the V^T clean sequences (states are tuples)."""
    states = all_states(model)
    mass = np.zeros(states.shape[0])
    mass[-1] = 1.0  # the all-MASK state has the largest index
    # Parents have more masks, hence a larger index than their children: descending order is topological.
    for s, children in sorted(_transitions(model), key=lambda item: -item[0]):
        for child, p in children:
            mass[child] += mass[s] * p
    clean = _clean_states(model)
    return Distribution(tuple(tuple(int(t) for t in states[s]) for s in clean), mass[clean] / mass[clean].sum())


def optimal_log_twist(model: MaskedDiffusionLM, log_potential_fn) -> np.ndarray:
    """log ψ*(x) = log E[φ(x_0) | x_t = x] for every state, float64 `[(V+1)^T]`.

    Args:
      log_potential_fn: `(tokens int32 [T]) -> f32 []`, log φ of a clean sequence.
    Returns:
      the table; entry (V+1)^T − 1 (all MASK) is log Z = log E[φ(x_0)].
    """
    states = all_states(model)
    clean = _clean_states(model)
    table = np.full(states.shape[0], -np.inf)
    table[clean] = np.asarray(jax.vmap(log_potential_fn)(jnp.asarray(states[clean])), np.float64)
    if np.isnan(table).any():
        raise NumericalError("log_potential_fn returned NaN on a clean sequence")
    for s, children in sorted(_transitions(model), key=lambda item: item[0]):
        child_index, p = map(np.asarray, zip(*children))
        with np.errstate(divide="ignore"):
            table[s] = scipy.special.logsumexp(np.log(p) + table[child_index])
    return table


def tabular_log_twist_fn(model: MaskedDiffusionLM):
    """A `log_twist_fn` reading log ψ from a table over states (`optimal_log_twist`'s).

    `fn(table [(V+1)^T], tokens int32 [T], step, features) -> [T, V]`: log ψ of the state with
    position i set to token v (entries at unmasked positions are never used).
    """
    c = model.config

    def log_twist_fn(table, tokens, step, features):
        del step, features
        powers = (c.vocab_size + 1) ** jnp.arange(c.seq_len)
        child = (state_index(model, tokens) + (jnp.arange(c.vocab_size)[None, :] - tokens[:, None])
                 * powers[:, None])
        return jnp.asarray(table, jnp.float32)[child]

    return log_twist_fn
