"""Exactly enumerable toy models and reward tables.

A tabular model holds one row of next-token logits per generated prefix: with a vocabulary
of 2–4 tokens (a stop token included) and at most 3–4 generated tokens, every completion can
be enumerated (`jaxsample.testing.enumerate_completions`). The models are ordinary
`LanguageModel`s (built with `LanguageModel.from_logits_fn`), so every sampler runs on them
unchanged.

The prompt of a tabular model is a single token (any id); the logits depend only on the
generated prefix. Prefixes of `max_new_tokens` or more tokens read an all-zero row, and the
rows of prefixes that continue past a stop token are never read by a correct sampler (they
are finite, so a stray read cannot produce NaN).
"""

from __future__ import annotations

import itertools
from typing import Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.validation import check_int, check_real

Prefix = tuple[int, ...]


def _num_prefixes(vocab_size: int, max_length: int) -> int:
    """Token strings of length 0..max_length."""
    return sum(vocab_size**m for m in range(max_length + 1))


def prefix_index(prefix: Prefix, vocab_size: int) -> int:
    """Row of `prefix` in a prefix table: by length, then as a base-V number (first token
    least significant)."""
    offset = sum(vocab_size**m for m in range(len(prefix)))
    return offset + sum(int(t) * vocab_size**k for k, t in enumerate(prefix))


def _check_size(vocab_size: int, max_new_tokens: int) -> None:
    check_int("vocab_size", vocab_size, 2)  # a stop token and one more
    check_int("max_new_tokens", max_new_tokens, 1)
    if _num_prefixes(vocab_size, max_new_tokens) > 1_000_000:
        raise ArgumentError(
            f"a tabular model with vocab_size={vocab_size} and max_new_tokens={max_new_tokens} "
            f"needs {_num_prefixes(vocab_size, max_new_tokens)} rows; keep vocab_size^"
            "max_new_tokens under 10^6"
        )


def _from_table(table: np.ndarray, vocab_size: int, eos_token_id: int, max_new_tokens: int,
                name: str) -> LanguageModel:
    """The model reading row `prefix_index(generated prefix)` of `table` `[P, V]`
    (P = rows of prefixes shorter than max_new_tokens, plus a last all-zero row)."""
    vocab, cap = vocab_size, max_new_tokens
    table = jnp.asarray(table, jnp.float32)
    offsets = np.array([sum(vocab**m for m in range(j)) for j in range(cap)] + [0])

    def logits_fn(tokens):
        # Position t of the sequence predicts generated token t; its prefix is the
        # generated tokens 1..t (the prompt is slot 0).
        size = tokens.shape[0]
        num_gen = np.arange(size)  # prefix length at each position
        digit = np.arange(size)[None, :]
        powers = np.where((digit < num_gen[:, None]) & (digit < cap),
                          vocab ** np.minimum(digit, cap), 0)
        generated = jnp.concatenate([tokens[1:], jnp.zeros((1,), tokens.dtype)])
        index = jnp.asarray(offsets[np.minimum(num_gen, cap)]) + jnp.asarray(powers) @ generated
        index = jnp.where(jnp.asarray(num_gen) < cap, index, table.shape[0] - 1)
        return table[index]

    return LanguageModel.from_logits_fn(logits_fn, vocab, eos_token_id,
                                        max_length=1 + max_new_tokens, name=name)


def tabular_lm(
    logits: Mapping[Prefix, Sequence[float]],
    vocab_size: int,
    eos_token_id: int,
    max_new_tokens: int,
    name: str = "tabular",
) -> LanguageModel:
    """A `LanguageModel` given by its next-token logits after every generated prefix.

    Args:
      logits: `{prefix: logits [V]}`; every prefix a completion can continue from (no stop
        token, shorter than `max_new_tokens`) must be given. `-inf` entries are tokens of
        probability exactly 0.
      vocab_size: V, the stop token included.
      eos_token_id: the stop token.
      max_new_tokens: the most generated tokens; the model's `max_length` is 1 + this (a
        one-token prompt).
      name: the model's name.

    Returns:
      The model; feed it a one-token prompt (any id).
    """
    _check_size(vocab_size, max_new_tokens)
    if not 0 <= eos_token_id < vocab_size:
        raise ArgumentError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {vocab_size})")
    table = np.zeros((_num_prefixes(vocab_size, max_new_tokens - 1) + 1, vocab_size))
    tokens = [t for t in range(vocab_size) if t != eos_token_id]
    for length in range(max_new_tokens):
        for prefix in itertools.product(tokens, repeat=length):
            if prefix not in logits:
                raise ArgumentError(f"logits has no row for prefix {prefix}")
    for prefix, row in logits.items():
        row = np.asarray(row, np.float64)
        prefix = tuple(int(t) for t in prefix)
        if len(prefix) >= max_new_tokens or any(not 0 <= t < vocab_size for t in prefix):
            raise ArgumentError(f"logits has a row for prefix {prefix}, which is not a prefix of "
                                f"fewer than {max_new_tokens} tokens in [0, {vocab_size})")
        if row.shape != (vocab_size,) or np.isnan(row).any() or not np.isfinite(row).any():
            raise ArgumentError(f"logits[{prefix}] must be {vocab_size} numbers, not NaN, at least "
                                f"one finite; got {row.tolist()}")
        table[prefix_index(prefix, vocab_size)] = row
    return _from_table(table, vocab_size, eos_token_id, max_new_tokens, name)


def random_tabular_lm(vocab_size: int, max_new_tokens: int, seed: int = 0,
                      temperature: float = 1.0) -> LanguageModel:
    """A tabular model with i.i.d. Gaussian logits N(0, 1) / `temperature` for every prefix;
    the stop token is the last id (V − 1). Low temperatures give peaked next-token laws."""
    _check_size(vocab_size, max_new_tokens)
    check_real("temperature", temperature, "(0, inf]")
    rows = _num_prefixes(vocab_size, max_new_tokens - 1) + 1
    table = np.random.default_rng(seed).normal(scale=1.0 / temperature, size=(rows, vocab_size))
    table[-1] = 0.0
    return _from_table(table, vocab_size, vocab_size - 1, max_new_tokens,
                       f"random-tabular-V{vocab_size}-N{max_new_tokens}-seed{seed}")


def karan_du_example() -> LanguageModel:
    """The two-token toy of Karan & Du's Example 1 (power_sampling spec §1).

    Tokens a = 0, b = 1 and a stop token 2 that is never drawn: p(a) = 4/9, p(b) = 5/9,
    p(b | a) = 1, p(a | b) = p(b | b) = 1/2. With α = 2, P(x_0 = a) is 0.16 / 0.285 = 0.561
    under p^α but 0.16 / 0.41 = 0.390 under low-temperature sampling (τ = 1/α).
    """
    a, b, never = np.log(4 / 9), np.log(5 / 9), -np.inf
    return tabular_lm({(): [a, b, never], (0,): [never, 0.0, never], (1,): [0.0, 0.0, never]},
                      vocab_size=3, eos_token_id=2, max_new_tokens=2, name="karan-du-example")


def _prefix_lookup(values, offsets, vocab_size, tokens, length):
    position = jnp.arange(tokens.shape[0])
    inside = position < length
    digits = jnp.where(inside, tokens, 0) * vocab_size ** jnp.minimum(position, 30)
    index = jnp.asarray(offsets)[length] + jnp.sum(jnp.where(inside, digits, 0))
    return jnp.asarray(values)[index]


PrefixFn = Callable[[jax.Array, jax.Array], jax.Array]


def prefix_table_fn(values: Union[Mapping[Prefix, float], Callable[[Prefix], object]],
                    vocab_size: int, max_length: int) -> PrefixFn:
    """A JAX function `(tokens int [W], length int []) -> value` reading a table of one value
    (scalar or array) per token string of length 0..`max_length`.

    It is a `jax.tree_util.Partial` whose table is a traced leaf, so it serves as a
    `reward_fn` or `lookahead` of `smc_decode` (two tables of the same shape share compiled
    programs), and the same function scores sequences in the enumeration.

    Args:
      values: `{prefix: value}` (missing prefixes read 0) or a function of the prefix tuple.
      vocab_size: V.
      max_length: the longest prefix looked up.
    """
    if _num_prefixes(vocab_size, max_length) > 1_000_000:
        raise ArgumentError(f"a prefix table of vocab_size={vocab_size}, max_length={max_length} "
                            "is too large to build")
    lookup = values if callable(values) else (lambda p: values.get(p, 0.0))
    prefixes = [p for m in range(max_length + 1)
                for p in itertools.product(range(vocab_size), repeat=m)]
    prefixes.sort(key=lambda p: prefix_index(p, vocab_size))
    rows = np.stack([np.asarray(lookup(p), np.float64) for p in prefixes])
    offsets = np.cumsum([0] + [vocab_size**m for m in range(max_length + 1)])
    return Partial(_prefix_lookup, rows, offsets, np.int32(vocab_size))


def random_reward(vocab_size: int, max_length: int, seed: int = 0, scale: float = 1.0) -> PrefixFn:
    """A reward `(tokens [W], length []) -> r` with i.i.d. N(0, scale²) values for every prefix
    of length 0..`max_length` (the empty prefix's value is unused: r(∅) is taken as 0)."""
    size = _num_prefixes(vocab_size, max_length)
    values = np.random.default_rng(seed).normal(scale=scale, size=size)
    offsets = np.cumsum([0] + [vocab_size**m for m in range(max_length + 1)])
    return Partial(_prefix_lookup, values, offsets, np.int32(vocab_size))
