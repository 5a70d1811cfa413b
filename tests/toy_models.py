"""Exact tabular language models for sampler tests, and enumeration over their completions.

A `TabularLM` holds one row of next-token logits per generated prefix. With a vocabulary of
2–4 tokens (a stop token included) and at most 3–4 generated tokens, every completion, its
exact log p and any target π ∝ p^α can be enumerated in float64. `TabularLM.lm()` wraps the
same table as a `jaxsample.LanguageModel` (through `LanguageModel.from_logits_fn`) for the
samplers under test.

The prompt is the single token `prompt_token`; the logits depend only on the generated
prefix. Prefixes of `cap` or more tokens read an all-zero row; rows of prefixes that
continue past a stop token are never read by a correct sampler (all rows are finite unless
set to -inf on purpose, so a stray read cannot produce NaN).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

import jaxsample as js

Prefix = tuple[int, ...]
NextLogProbs = Callable[[Prefix], np.ndarray]


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    finite = np.isfinite(scores)
    shifted = scores - np.max(scores[finite])
    return np.where(finite, shifted - logsumexp(shifted[finite]), -np.inf)


@dataclass(frozen=True)
class TabularLM:
    """An autoregressive model given by a logits table keyed by the generated prefix.

    Attributes:
      table: float64 `[num_prefixes, V]`; row `prefix_index(h)` holds the logits of the
        token after generated prefix h (`-inf` allowed: probability exactly 0).
      vocab_size: V, the stop token included (enumeration grows as V^cap).
      eos: the stop token.
      cap: the most generated tokens a completion may have.
      prompt_token: the one-token prompt.
    """

    table: np.ndarray
    vocab_size: int
    eos: int
    cap: int
    prompt_token: int = 0

    @staticmethod
    def num_prefixes(vocab_size: int, cap: int) -> int:
        return sum(vocab_size**m for m in range(cap)) + 1  # + the all-zero "beyond" row

    @classmethod
    def random(cls, seed: int, vocab_size: int = 4, cap: int = 4, scale: float = 1.5,
               eos: int | None = None, prompt_token: int = 0) -> "TabularLM":
        """Gaussian logits (std `scale`) for every prefix; the stop token is the last id."""
        eos = vocab_size - 1 if eos is None else eos
        table = np.random.default_rng(seed).normal(
            scale=scale, size=(cls.num_prefixes(vocab_size, cap), vocab_size))
        table[-1] = 0.0
        return cls(table, vocab_size, eos, cap, prompt_token)

    @classmethod
    def from_dict(cls, logits: Mapping[Prefix, Sequence[float]], vocab_size: int, eos: int,
                  cap: int, prompt_token: int = 0) -> "TabularLM":
        """Builds the table from `{prefix: logits[V]}`; every prefix a completion can
        continue from (no stop token, shorter than `cap`) must be given."""
        table = np.zeros((cls.num_prefixes(vocab_size, cap), vocab_size))
        model = cls(table, vocab_size, eos, cap, prompt_token)
        for prefix in model.open_prefixes():
            if prefix not in logits:
                raise KeyError(f"no logits for prefix {prefix}")
        for prefix, row in logits.items():
            table[model.prefix_index(prefix)] = np.asarray(row, np.float64)
        return model

    def prefix_index(self, prefix: Prefix) -> int:
        """Row of the table: prefixes ordered by length, then as base-V numbers (first
        token least significant)."""
        if len(prefix) >= self.cap:
            return self.table.shape[0] - 1
        offset = sum(self.vocab_size**m for m in range(len(prefix)))
        return offset + sum(t * self.vocab_size**k for k, t in enumerate(prefix))

    def open_prefixes(self) -> list[Prefix]:
        """Every prefix a completion can still continue from."""
        tokens = [t for t in range(self.vocab_size) if t != self.eos]
        return [p for m in range(self.cap) for p in itertools.product(tokens, repeat=m)]

    def logits(self, prefix: Prefix) -> np.ndarray:
        return self.table[self.prefix_index(prefix)]

    def log_p(self, prefix: Prefix) -> np.ndarray:
        """float64 `[V]` log p(· | prefix)."""
        return _log_softmax(self.logits(prefix))

    def entropy(self, prefix: Prefix) -> float:
        log_p = self.log_p(prefix)
        finite = np.isfinite(log_p)
        return float(-np.sum(np.exp(log_p) * np.where(finite, log_p, 0.0)))

    def log_q(self, prefix: Prefix, temperature: float = 1.0, top_k: int = 0) -> np.ndarray:
        """float64 `[V]` log-probabilities of the tempered, top-k truncated proposal."""
        scores = self.logits(prefix) / temperature
        if top_k:
            scores = np.where(scores < np.sort(scores)[-top_k], -np.inf, scores)
        return _log_softmax(scores)

    def lm(self, max_length: int | None = None) -> js.LanguageModel:
        """The same model as a `jaxsample.LanguageModel` (default max_length 1 + cap)."""
        vocab, cap = self.vocab_size, self.cap
        table = jnp.asarray(self.table, jnp.float32)
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

        return js.LanguageModel.from_logits_fn(
            logits_fn, vocab, self.eos, max_length=1 + cap if max_length is None else max_length,
            name="tabular-toy")

    def prompt(self) -> jax.Array:
        return jnp.array([self.prompt_token], jnp.int32)

    def completions(self, cap: int | None = None, prefix: Prefix = ()) -> list[Prefix]:
        """All completions extending `prefix`: sequences ending at their first stop token
        with at most `cap` tokens, or exactly `cap` tokens without one (`cap` defaults to
        the model's; a smaller one gives the block states of a block-wise sampler)."""
        cap = self.cap if cap is None else cap
        if (prefix and prefix[-1] == self.eos) or len(prefix) >= cap:
            return [prefix]
        return [c for t in range(self.vocab_size) for c in self.completions(cap, prefix + (t,))]

    def sequence_log_prob(self, seq: Prefix, start: int = 0,
                          next_log_probs: NextLogProbs | None = None) -> float:
        """Σ_{t ≥ start} log p(seq_t | seq_<t) (or under `next_log_probs`)."""
        next_log_probs = self.log_p if next_log_probs is None else next_log_probs
        return float(sum(next_log_probs(seq[:t])[seq[t]] for t in range(start, len(seq))))

    def per_token(self, seq: Prefix, next_log_q: NextLogProbs) -> dict[str, np.ndarray]:
        """float64 per-position log p, log q and entropy of `seq`."""
        return {
            "log_p": np.array([self.log_p(seq[:t])[seq[t]] for t in range(len(seq))]),
            "log_q": np.array([next_log_q(seq[:t])[seq[t]] for t in range(len(seq))]),
            "entropy": np.array([self.entropy(seq[:t]) for t in range(len(seq))]),
        }


def power_target(log_p: np.ndarray, alpha: float) -> np.ndarray:
    """π ∝ exp(α log p), normalised in float64 (states with p = 0 get π = 0)."""
    scaled = alpha * np.asarray(log_p, np.float64)
    return np.exp(scaled - logsumexp(scaled))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.sum(np.abs(np.asarray(p) - np.asarray(q))))


def karan_du_example() -> TabularLM:
    """The two-token toy of Karan & Du's Example 1 (spec §1): p(a) = 4/9, p(b|a) = 1,
    p(a|b) = p(b|b) = 1/2, with the stop token (id 2) never drawn. With α = 2,
    P_π(x_0 = a) = 0.16 / 0.285 while τ = 1/2 sampling gives 0.16 / 0.41."""
    a, b, never = np.log(4 / 9), np.log(5 / 9), -np.inf
    return TabularLM.from_dict(
        {(): [a, b, never], (0,): [never, 0.0, never], (1,): [0.0, 0.0, never]},
        vocab_size=3, eos=2, cap=2)
