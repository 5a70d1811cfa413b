"""Exact pieces of twisted SMC on a tabular toy: terminal potentials, the optimal twist
(the value function), σ, Z, and tabular twists whose table is the twist's parameters."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from toy_models import TabularLM

from . import exact


def finished(toy: TabularLM, prefix, max_length: int) -> bool:
    return bool(prefix) and (prefix[-1] == toy.eos or len(prefix) >= max_length)


def terminal_table(toy: TabularLM, seed: int, max_length: int, scale: float = 1.5):
    """log φ: random on finished sequences, 0 on the other prefixes (never read there)."""
    rng = np.random.default_rng(seed)
    return exact.PrefixTable.from_function(
        lambda h: rng.normal(scale=scale) if finished(toy, h, max_length) else 0.0,
        toy.vocab_size, max_length)


def log_z(toy: TabularLM, log_phi, max_length: int) -> float:
    return exact.log_z(toy, 1.0, 1.0, log_phi, max_length)


def sigma(toy: TabularLM, log_phi, max_length: int):
    """`(completions, σ)` with σ ∝ p φ."""
    return exact.target(toy, max_length, 1.0, 1.0, log_phi)


def optimal_log_twist(toy: TabularLM, log_phi, max_length: int):
    """log ψ*(h) = log E_p[φ | h]: the value on open prefixes, log φ on finished ones."""
    value = exact.value_table(toy, 1.0, 1.0, log_phi, max_length)
    return exact.PrefixTable(value.values + log_phi.values, toy.vocab_size, max_length)


@functools.lru_cache(maxsize=None)
def table_twist_fn(vocab_size: int, max_length: int):
    """`log_twist_fn(params, tokens, length, features)` reading log ψ of every extension
    `tokens[:length] + (v,)` from `params`, a flat table indexed like `PrefixTable`."""
    offsets = np.cumsum([0] + [vocab_size**m for m in range(max_length + 1)])[:-1]
    candidates = jnp.arange(vocab_size)

    def log_twist_fn(params, tokens, length, features):
        del features
        length = jnp.minimum(length, max_length - 1)  # rows already full: never sampled
        position = jnp.arange(tokens.shape[0])
        digits = jnp.where(position < length, tokens, 0) * vocab_size ** jnp.minimum(position, 30)
        index = jnp.asarray(offsets)[length + 1] + jnp.sum(digits) + candidates * vocab_size**length
        return params[index]

    return log_twist_fn


def histogram_of(result, states):
    return exact.histogram(states, np.asarray(result.tokens), np.asarray(result.lengths),
                           np.exp(np.asarray(result.log_weights, np.float64)))


def sample_sigma(rng, states, probs):
    return states[rng.choice(len(states), p=probs)]


def padded(seq, width: int, pad: int) -> np.ndarray:
    row = np.full(width, pad, np.int32)
    row[: len(seq)] = seq
    return row

