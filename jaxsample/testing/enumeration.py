"""Every completion of a prompt under a small `LanguageModel`, with exact float64 values.

A completion is a token string that ends at its first stop token, or has exactly `cap`
tokens without one (`cap` = max_new_tokens, or a smaller block cap: then the unterminated
strings are the states of a block-wise sampler's block, scored by their prefix marginal,
with no stop factor). The model is queried once per open prefix (one full forward of
prompt + prefix, batched per length); everything after is float64 arithmetic on the logits
it returned, so the enumeration is the exact law of the model as the samplers see it
(float32 logits), up to float64 rounding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy

from jaxsample.decoding import DecodeState
from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.mcmc.acceptance import Trace
from jaxsample.sampling import Proposal, proposal_log_probs
from jaxsample.validation import check_int

Prefix = tuple[int, ...]

MAX_COMPLETIONS = 200_000
_BATCH = 4096


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis; `-inf` scores stay `-inf`."""
    finite = np.isfinite(scores)
    top = np.max(np.where(finite, scores, -np.inf), axis=-1, keepdims=True)
    shifted = np.where(finite, scores - top, -np.inf)
    return shifted - scipy.special.logsumexp(shifted, axis=-1, keepdims=True)


@jax.jit
def _logits_at(lm: LanguageModel, tokens: jax.Array, position: jax.Array) -> jax.Array:
    """`[B, V]` logits at `position [B]` of each row of `tokens [B, T]`."""
    return jnp.take_along_axis(lm.logits(tokens), position[:, None, None], axis=1)[:, 0]


def _proposal_key(proposal: Proposal) -> tuple:
    return (float(proposal.temperature), int(proposal.top_k), float(proposal.top_p))


@dataclass(frozen=True, eq=False)
class Enumeration:
    """The exact law of a model's completions of one prompt (see the module docstring).

    Attributes:
      prompt: the prompt's token ids.
      max_new_tokens: N, the cap on generated tokens.
      vocab_size: V.
      eos_token_ids: the stop set.
      pad_token_id: the model's pad id (fills traces after their length).
      logits: `{open prefix: float64 [V]}`, the next-token logits after every prefix that
        has no stop token and fewer than N tokens.
      sequences: the S completions (cap N), in depth-first token order.
      log_p: float64 `[S]`, log p(completion | prompt), the stop token's factor included.
    """

    prompt: Prefix
    max_new_tokens: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    logits: dict
    sequences: tuple[Prefix, ...] = field(init=False)
    log_p: np.ndarray = field(init=False)
    _next_log_p: dict = field(init=False, repr=False)
    _log_q: dict = field(init=False, repr=False)

    def __post_init__(self):
        next_log_p = {prefix: _log_softmax(row) for prefix, row in self.logits.items()}
        object.__setattr__(self, "_next_log_p", next_log_p)
        object.__setattr__(self, "_log_q", {})
        sequences = tuple(self.states())
        object.__setattr__(self, "sequences", sequences)
        object.__setattr__(self, "log_p", np.array([self.log_prob(x) for x in sequences]))

    def is_finished(self, prefix: Prefix, cap: Optional[int] = None) -> bool:
        """True when `prefix` ends with a stop token or has `cap` (default N) tokens."""
        cap = self.max_new_tokens if cap is None else cap
        return bool(prefix) and prefix[-1] in self.eos_token_ids or len(prefix) >= cap

    def states(self, cap: Optional[int] = None, prefix: Prefix = ()) -> list[Prefix]:
        """The completions of cap `cap` (default N) that extend `prefix`."""
        cap = self.max_new_tokens if cap is None else cap
        if not 1 <= cap <= self.max_new_tokens:
            raise ArgumentError(f"cap must lie in [1, {self.max_new_tokens}], got {cap}")
        if self.is_finished(prefix, cap):
            return [prefix]
        return [x for t in range(self.vocab_size) for x in self.states(cap, prefix + (t,))]

    def next_log_probs(self, prefix: Prefix) -> np.ndarray:
        """float64 `[V]` log p(· | prompt, prefix) after an open prefix."""
        try:
            return self._next_log_p[tuple(prefix)]
        except KeyError:
            raise ArgumentError(f"{tuple(prefix)} is not an open prefix (no stop token, fewer "
                                f"than {self.max_new_tokens} tokens)") from None

    def entropy(self, prefix: Prefix) -> float:
        """Entropy of p(· | prompt, prefix) in nats (0·log 0 = 0)."""
        log_p = self.next_log_probs(prefix)
        finite = np.isfinite(log_p)
        return float(-np.sum(np.exp(log_p[finite]) * log_p[finite]))

    def proposal_log_probs(self, prefix: Prefix, proposal: Proposal) -> np.ndarray:
        """float64 `[V]` log q(· | prefix) of `proposal`: the support is the one
        `jaxsample.proposal_log_probs` keeps (temperature, top-k, top-p), renormalised in
        float64 so that every proposal law sums to 1 to float64 precision."""
        key = _proposal_key(proposal)
        if key not in self._log_q:
            prefixes = list(self.logits)
            logits = np.stack([self.logits[p] for p in prefixes])
            support = np.isfinite(np.asarray(proposal_log_probs(jnp.asarray(logits), proposal)))
            log_q = _log_softmax(np.where(support, logits / key[0], -np.inf))
            self._log_q[key] = dict(zip(prefixes, log_q))
        return self._log_q[key][tuple(prefix)]

    def log_prob(self, sequence: Prefix, start: int = 0,
                 proposal: Optional[Proposal] = None) -> float:
        """Σ_{t ≥ start} log p(x_t | x_<t) (or log q under `proposal`): the log-probability of
        drawing `sequence[start:]` after `sequence[:start]`."""
        sequence = tuple(sequence)
        total = 0.0
        for t in range(start, len(sequence)):
            row = (self.next_log_probs(sequence[:t]) if proposal is None
                   else self.proposal_log_probs(sequence[:t], proposal))
            total += row[sequence[t]]
        return float(total)

    def tokens(self, states: Sequence[Prefix]) -> tuple[np.ndarray, np.ndarray]:
        """`(tokens int32 [S, N] padded with the pad id, lengths int32 [S])` of `states`."""
        tokens = np.full((len(states), self.max_new_tokens), self.pad_token_id, np.int32)
        for s, state in enumerate(states):
            tokens[s, :len(state)] = state
        return tokens, np.array([len(x) for x in states], np.int32)

    def traces(self, states: Sequence[Prefix], proposal: Proposal) -> Trace:
        """float64 `Trace`s `[S, N]` of `states`: per-token log p, log q under `proposal`,
        entropy of p, and the padded tokens, exactly as the decoder stores them."""
        tokens, lengths = self.tokens(states)
        values = np.zeros((3, len(states), self.max_new_tokens))
        for s, state in enumerate(states):
            for t in range(len(state)):
                values[0, s, t] = self.next_log_probs(state[:t])[state[t]]
                values[1, s, t] = self.proposal_log_probs(state[:t], proposal)[state[t]]
                values[2, s, t] = self.entropy(state[:t])
        return Trace(tokens, values[0], values[1], values[2], lengths)

    def evaluate(self, fn: Callable[[jax.Array, jax.Array], jax.Array],
                 states: Sequence[Prefix]) -> np.ndarray:
        """float64 `fn(tokens [N], length [])` of every state (e.g. a reward), vmapped in
        float64."""
        tokens, lengths = self.tokens(states)
        with jax.enable_x64(True):
            values = jax.jit(jax.vmap(fn))(jnp.asarray(tokens), jnp.asarray(lengths))
            values = np.asarray(values, np.float64)
        if values.shape[:1] != (len(states),):
            raise ArgumentError(f"fn(tokens [N], length []) must return one value per sequence; "
                                f"vmapped over {len(states)} sequences it returned {values.shape}")
        if np.isnan(values).any():
            bad = states[int(np.argwhere(np.isnan(values))[0][0])]
            raise ArgumentError(f"fn returned NaN for the sequence {bad}")
        return values


def enumerate_completions(lm: LanguageModel, prompt, max_new_tokens: int,
                          max_completions: int = MAX_COMPLETIONS) -> Enumeration:
    """Enumerates every completion of `prompt` under `lm` with its exact log-probability.

    Works for any `LanguageModel` whose completion tree is small: with O non-stop tokens
    there are Σ_{m<N} O^m·|stop set| + O^N completions (a 3-token + stop toy with N = 4 has
    121; a 50k-vocabulary model is out of reach beyond N = 1).

    Args:
      lm: the model.
      prompt: int `[T]` prompt tokens.
      max_new_tokens: N, the cap on generated tokens (T + N must fit `lm.max_length`).
      max_completions: refuse (ArgumentError) to enumerate more completions than this.

    Returns:
      `Enumeration` with every completion, its float64 log p and the next-token logits of
      every open prefix.
    """
    prompt = tuple(int(t) for t in np.asarray(prompt).reshape(-1))
    if not prompt:
        raise ArgumentError("prompt must hold at least one token")
    if any(not 0 <= t < lm.vocab_size for t in prompt):
        raise ArgumentError(f"prompt {prompt} has tokens outside the vocabulary [0, {lm.vocab_size})")
    check_int("max_new_tokens", max_new_tokens, 1)
    if len(prompt) + max_new_tokens > lm.max_length:
        raise ArgumentError(f"prompt ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} "
                            f"exceeds the {lm.max_length} positions of model {lm.name!r}")
    stops = tuple(sorted(set(lm.eos_token_ids)))
    kept = [t for t in range(lm.vocab_size) if t not in stops]
    count = sum(len(kept) ** m * len(stops) for m in range(max_new_tokens)) + len(kept) ** max_new_tokens
    if count > max_completions:
        raise ArgumentError(
            f"{lm.name!r} has {count} completions of up to {max_new_tokens} tokens "
            f"(vocabulary {lm.vocab_size}), more than max_completions={max_completions}"
        )
    # Every open prefix, right-padded to one width (the model is causal, so the padding
    # never reaches the logits read at the prefix's last position): one compiled forward.
    open_prefixes = [p for depth in range(max_new_tokens) for p in itertools.product(kept, repeat=depth)]
    width = len(prompt) + max_new_tokens - 1
    rows = np.zeros((len(open_prefixes), width), np.int32)
    for r, p in enumerate(open_prefixes):
        rows[r, :len(prompt) + len(p)] = prompt + p
    last = np.array([len(prompt) + len(p) - 1 for p in open_prefixes], np.int32)
    batch = min(_BATCH, len(open_prefixes))
    padded = -(-len(open_prefixes) // batch) * batch  # whole chunks: one shape, one compile
    rows = np.concatenate([rows, np.zeros((padded - len(rows), width), np.int32)])
    last = np.concatenate([last, np.zeros(padded - len(last), np.int32)])
    values = np.concatenate([
        np.asarray(_logits_at(lm, jnp.asarray(rows[i:i + batch]), jnp.asarray(last[i:i + batch])))
        for i in range(0, padded, batch)
    ])[:len(open_prefixes)].astype(np.float64)
    if np.isnan(values).any():
        bad = open_prefixes[int(np.argwhere(np.isnan(values))[0][0])]
        raise ArgumentError(f"{lm.name!r} returned NaN logits after the prefix {bad}")
    logits = dict(zip(open_prefixes, values))
    return Enumeration(prompt, max_new_tokens, lm.vocab_size, stops, lm.pad_token_id, logits)


@partial(jax.jit, static_argnames="capacity")
def _prefill(lm, tokens, lengths, capacity):
    return lm.prefill(tokens, lengths, lm.init_cache(tokens.shape[0], capacity))


def decode_state(lm: LanguageModel, completions: Enumeration, sequences: Sequence[Prefix],
                 proposal: Proposal) -> DecodeState:
    """A `DecodeState` whose rows hold `sequences` as if a sampler had generated them: the
    prompt and tokens prefilled through the model's own cache, per-token log p, log q (under
    `proposal`) and entropy from the enumeration (float32). Use it to start a kernel from
    chosen or exactly sampled states.
    """
    prompt, width = completions.prompt, completions.max_new_tokens
    tokens, lengths = completions.tokens(sequences)
    full = np.zeros((len(sequences), len(prompt) + width), np.int32)
    full[:, :len(prompt)] = prompt
    full[:, len(prompt):] = np.where(np.arange(width) < lengths[:, None], tokens, 0)
    trace = completions.traces(sequences, proposal)
    logits, cache = _prefill(lm, jnp.asarray(full), jnp.asarray(len(prompt) + lengths),
                             len(prompt) + width)
    rows = len(sequences)
    return DecodeState(
        tokens=jnp.asarray(tokens),
        log_p=jnp.asarray(trace.log_p, jnp.float32),
        log_q=jnp.asarray(trace.log_q, jnp.float32),
        entropy=jnp.asarray(trace.entropy, jnp.float32),
        length=jnp.asarray(lengths),
        done=jnp.asarray([bool(x) and x[-1] in completions.eos_token_ids for x in sequences]),
        prompt_length=jnp.full((rows,), len(prompt), jnp.int32),
        last_prompt_token=jnp.full((rows,), prompt[-1], jnp.int32),
        cache=cache,
        next_logits=logits,
    )
