"""Exact targets for SMC tests on a tabular toy model: rewards, Z, future values, π_t.

A reward is a table with one entry per prefix (any length 0..S, stop tokens included),
looked up in JAX by the same index as in float64 numpy, so the sampler and the enumeration
score sequences identically. All enumeration is float64 over `TabularLM.completions`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from toy_models import TabularLM

Prefix = tuple[int, ...]


class PrefixTable:
    """A value per prefix of at most `max_length` tokens over a vocabulary of `vocab_size`."""

    def __init__(self, values: np.ndarray, vocab_size: int, max_length: int):
        self.values, self.vocab_size, self.max_length = values, vocab_size, max_length
        self._offsets = np.cumsum([0] + [vocab_size**m for m in range(max_length + 1)])
        assert values.shape == (self._offsets[-1],)

    @classmethod
    def random(cls, seed: int, vocab_size: int, max_length: int, scale: float = 1.0):
        size = sum(vocab_size**m for m in range(max_length + 1))
        values = np.random.default_rng(seed).normal(scale=scale, size=size)
        return cls(values, vocab_size, max_length)

    @classmethod
    def from_function(cls, fn, vocab_size: int, max_length: int):
        size = sum(vocab_size**m for m in range(max_length + 1))
        table = cls(np.zeros(size), vocab_size, max_length)
        for m in range(max_length + 1):
            for prefix in np.ndindex(*(vocab_size,) * m):
                table.values[table.index(prefix)] = fn(tuple(int(t) for t in prefix))
        return table

    def index(self, prefix: Prefix) -> int:
        digits = sum(t * self.vocab_size**k for k, t in enumerate(prefix))
        return int(self._offsets[len(prefix)] + digits)

    def __getitem__(self, prefix: Prefix) -> float:
        return float(self.values[self.index(tuple(prefix))])

    @functools.cached_property
    def jax_fn(self):
        """`(tokens int [W], length []) -> f32 []`, tokens at and after `length` ignored (one
        function object per table, so runs sharing a table share compiled programs)."""
        # numpy constants, converted when traced (float64 under jax.enable_x64).
        values, offsets, vocab = self.values, self._offsets[:-1], self.vocab_size

        def lookup(tokens, length):
            position = jnp.arange(tokens.shape[0])
            digits = jnp.where(position < length, tokens, 0) * vocab ** jnp.minimum(position, 30)
            index = jnp.asarray(offsets)[length] + jnp.sum(jnp.where(position < length, digits, 0))
            return jnp.asarray(values)[index]

        return lookup


def log_gamma(toy: TabularLM, seq: Prefix, alpha, lam, reward: PrefixTable | None) -> float:
    """log γ(seq) = α log p(seq) + λ r(seq) (r of the empty prefix taken as 0)."""
    r = reward[seq] if reward is not None and seq else 0.0
    return alpha * toy.sequence_log_prob(seq) + lam * r


def log_value(toy: TabularLM, prefix: Prefix, alpha, lam, reward, max_length: int) -> float:
    """Exact log V(prefix) = log Σ_{completions y ⊒ prefix} γ(y) / γ(prefix); 0 if finished."""
    if (prefix and prefix[-1] == toy.eos) or len(prefix) >= max_length:
        return 0.0
    here = log_gamma(toy, prefix, alpha, lam, reward)
    return float(logsumexp([log_gamma(toy, y, alpha, lam, reward) - here
                            for y in toy.completions(max_length, prefix)]))


def value_table(toy: TabularLM, alpha, lam, reward, max_length: int) -> PrefixTable:
    """Exact log V of every prefix (entries for prefixes past a stop token are unused)."""
    def fn(prefix):
        if toy.eos in prefix[:-1]:
            return 0.0
        return log_value(toy, prefix, alpha, lam, reward, max_length)
    return PrefixTable.from_function(fn, toy.vocab_size, max_length)


def target(toy: TabularLM, cap: int, alpha, lam, reward, value: PrefixTable | None = None):
    """`(states, π)` over the block states of cap `cap`: π ∝ γ (· V when `value` is given)."""
    states = toy.completions(cap)
    log_pi = np.array([log_gamma(toy, x, alpha, lam, reward) + (value[x] if value else 0.0)
                       for x in states])
    return states, np.exp(log_pi - logsumexp(log_pi))


def log_z(toy: TabularLM, alpha, lam, reward, max_length: int) -> float:
    completions = toy.completions(max_length)
    return float(logsumexp([log_gamma(toy, y, alpha, lam, reward) for y in completions]))


def histogram(states, tokens: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None = None):
    """Weighted frequency of each state among rows `tokens[i, :lengths[i]]`."""
    index = {x: k for k, x in enumerate(states)}
    rows = [index[tuple(int(t) for t in row[:n])] for row, n in zip(tokens, lengths)]
    weights = np.ones(len(rows)) / len(rows) if weights is None else weights
    return np.bincount(rows, weights=weights, minlength=len(states))


@jax.jit
def _prefill(lm, tokens, lengths):
    return lm.prefill(tokens, lengths, lm.init_cache(*tokens.shape))


def decode_state(toy: TabularLM, lm, sequences, max_new_tokens: int, temperature: float = 1.0):
    """A `DecodeState` whose rows hold `sequences` as generated tokens (prefilled through the
    model's own cache, per-token log p / log q / entropy from the exact table)."""
    from jaxsample.decoding import DecodeState

    rows, width = len(sequences), 1 + max_new_tokens
    full = np.zeros((rows, width), np.int32)
    tokens = np.full((rows, max_new_tokens), lm.pad_token_id, np.int32)
    scores = {k: np.zeros((rows, max_new_tokens), np.float32)
              for k in ("log_p", "log_q", "entropy")}
    for i, seq in enumerate(sequences):
        full[i, 0], full[i, 1:1 + len(seq)], tokens[i, :len(seq)] = toy.prompt_token, seq, seq
        per_token = toy.per_token(tuple(seq), lambda h: toy.log_q(h, temperature))
        for k, v in per_token.items():
            scores[k][i, :len(seq)] = v
    lengths = np.array([len(s) for s in sequences], np.int32)
    logits, cache = _prefill(lm, jnp.asarray(full), jnp.asarray(1 + lengths))
    return DecodeState(
        tokens=jnp.asarray(tokens),
        log_p=jnp.asarray(scores["log_p"]),
        log_q=jnp.asarray(scores["log_q"]),
        entropy=jnp.asarray(scores["entropy"]),
        length=jnp.asarray(lengths),
        done=jnp.asarray([bool(s) and s[-1] == toy.eos for s in sequences]),
        prompt_length=jnp.ones((rows,), jnp.int32),
        last_prompt_token=jnp.full((rows,), toy.prompt_token, jnp.int32),
        cache=cache,
        next_logits=logits,
    )
