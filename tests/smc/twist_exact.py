"""Twisted SMC on an enumerable toy, built on `jaxsample.testing`: a terminal potential φ,
the exact σ ∝ p φ with its log Z, the optimal twist ψ* (`testing.value_function`) and a
tabular `log_twist_fn` whose table is the twist's parameters (so it can be learned)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxsample import testing
from jaxsample.testing.toy import prefix_index

S = 4  # max_new_tokens
V = 4  # 3 tokens + the stop token
PROMPT = jnp.array([0], jnp.int32)


class Toy(NamedTuple):
    lm: object
    completions: testing.Enumeration
    log_phi: object          # (tokens, length) -> log φ, 0 on unfinished prefixes
    sigma: testing.Distribution
    optimal: jnp.ndarray     # the optimal twist's table (parameters of `table_twist_fn`)


def make_toy(seed: int = 5, potential_seed: int = 6, scale: float = 1.5) -> Toy:
    lm = testing.random_tabular_lm(vocab_size=V, max_new_tokens=S, seed=seed)
    completions = testing.enumerate_completions(lm, PROMPT, S)
    rng = np.random.default_rng(potential_seed)
    log_phi = testing.prefix_table_fn(
        {x: rng.normal(scale=scale) for x in completions.sequences}, V, S)
    sigma = testing.tilted_target(completions, log_phi, alpha=1.0, lam=1.0)
    value = testing.value_function(completions, log_phi, alpha=1.0, lam=1.0)
    return Toy(lm, completions, log_phi, sigma, table_of(value.log_twist))


def table_of(log_twist: dict) -> jnp.ndarray:
    """The flat table (prefixes of length ≤ S, `prefix_index` order) of a `{prefix: log ψ}`."""
    values = np.zeros(prefix_index((V - 1,) * S, V) + 1)
    for prefix, value in log_twist.items():
        values[prefix_index(prefix, V)] = value
    return jnp.asarray(values, jnp.float32)


@functools.lru_cache(maxsize=None)
def table_twist_fn():
    """`log_twist_fn(params, tokens, length, features)`: log ψ of every extension
    `tokens[:length] + (v,)`, read from the flat table `params`."""
    offsets = np.cumsum([0] + [V**m for m in range(S + 1)])[:-1]
    candidates = jnp.arange(V)

    def log_twist_fn(params, tokens, length, features):
        del features
        length = jnp.minimum(length, S - 1)  # rows already full are never sampled
        position = jnp.arange(tokens.shape[0])
        digits = jnp.where(position < length, tokens, 0) * V ** jnp.minimum(position, 30)
        index = jnp.asarray(offsets)[length + 1] + jnp.sum(digits) + candidates * V**length
        return params[index]

    return log_twist_fn


def padded(seq, pad: int) -> np.ndarray:
    row = np.full(S, pad, np.int32)
    row[: len(seq)] = seq
    return row


def sigma_references(toy: Toy, num: int, seed: int) -> np.ndarray:
    """`[num, S]` exact draws from σ (pad after the stop token)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(toy.sigma.states), size=num, p=toy.sigma.probs)
    return np.stack([padded(toy.sigma.states[i], toy.lm.pad_token_id) for i in picks])
