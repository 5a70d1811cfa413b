"""Exact target laws over an enumeration: p^α, reward-tilted targets and the optimal twist.

All values are float64. A reward is the samplers' own `reward_fn(tokens [W], length []) ->
r` (see `jaxsample.smc`), evaluated on every state; as in `smc_decode`, r of the empty prefix
is taken as 0 and a block state (an unterminated prefix at a block cap) is scored by its own
reward, the "difference potential" convention whose factors telescope to exp(λ r(y)).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
import scipy

from jaxsample.errors import ArgumentError
from jaxsample.testing.enumeration import Enumeration, Prefix
from jaxsample.testing.toy import PrefixFn, prefix_table_fn

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


class Distribution(NamedTuple):
    """A law over an enumerated state space.

    Attributes:
      states: the S states (token tuples).
      probs: float64 `[S]`, summing to 1.
      log_z: log of the unnormalised mass the law was normalised by (log Z of a target; 0
        for a law that was built normalised, such as a sampler's).
    """

    states: tuple[Prefix, ...]
    probs: np.ndarray
    log_z: float = 0.0

    @classmethod
    def from_log_weights(cls, states, log_weights) -> "Distribution":
        """π ∝ exp(log_weights) (states of weight exp(−inf) = 0 get probability 0)."""
        log_weights = np.asarray(log_weights, np.float64)
        if np.isnan(log_weights).any():
            bad = states[int(np.argwhere(np.isnan(log_weights))[0][0])]
            raise ArgumentError(f"the log weight of state {bad} is NaN")
        log_z = float(scipy.special.logsumexp(log_weights))
        if not np.isfinite(log_z):
            raise ArgumentError(f"the target has total mass exp({log_z}); it must be positive and finite")
        return cls(tuple(states), np.exp(log_weights - log_z), log_z)

    def prob(self, state: Prefix) -> float:
        """The probability of one state (0 for a state outside `states`)."""
        return float(dict(zip(self.states, self.probs)).get(tuple(state), 0.0))

    def restricted(self, keep) -> "Distribution":
        """The law conditioned on the states where `keep` (bool `[S]`) holds, e.g. those a
        truncated (top-k / top-p) proposal can reach."""
        keep = np.asarray(keep, bool)
        mass = float(self.probs[keep].sum())
        if not mass > 0:
            raise ArgumentError("the restriction keeps no probability mass")
        states = tuple(x for x, k in zip(self.states, keep) if k)
        return Distribution(states, self.probs[keep] / mass, self.log_z + np.log(mass))


def power_target(completions: Enumeration, alpha: float, cap: Optional[int] = None) -> Distribution:
    """π ∝ p(x | prompt)^α over the completions of cap `cap` (default N).

    With a block cap L < N the states are the block-k states of the block-wise sampler and
    the base is the prefix marginal p(x_{≤L}) (no stop factor for unterminated prefixes),
    the target π_k of Karan & Du's Eq. 10–11.
    """
    states = completions.states(cap)
    log_p = np.array([completions.log_prob(x) for x in states])
    return Distribution.from_log_weights(states, np.where(np.isneginf(log_p), -np.inf, alpha * log_p))


def _rewards(completions: Enumeration, reward_fn: Optional[RewardFn], states) -> np.ndarray:
    if reward_fn is None:
        return np.zeros(len(states))
    rewards = completions.evaluate(reward_fn, states)
    if rewards.shape != (len(states),):
        raise ArgumentError(f"reward_fn must return a scalar per sequence, got shape {rewards.shape[1:]}")
    return np.where(np.array([len(x) for x in states]) == 0, 0.0, rewards)


def _log_tilt(lam: float, rewards: np.ndarray) -> np.ndarray:
    # λ = 0 contributes exactly 0, also for r = ±inf (hard constraints).
    return np.zeros_like(rewards) if lam == 0 else lam * rewards


def tilted_target(completions: Enumeration, reward_fn: RewardFn, alpha: float = 1.0,
                  lam: float = 1.0, cap: Optional[int] = None) -> Distribution:
    """π(y) ∝ p(y)^α · exp(λ r(y)) over the completions of cap `cap` (default N), the target
    of `smc_decode(..., reward_fn, alpha=α, lam=λ)`; `log_z` is log Σ_y p(y)^α exp(λ r(y)),
    what SMC's log Ẑ estimates. With a block cap it is SMC's prefix-only intermediate target
    γ_t."""
    states = completions.states(cap)
    log_p = np.array([completions.log_prob(x) for x in states])
    power = np.where(np.isneginf(log_p), -np.inf, alpha * log_p)
    return Distribution.from_log_weights(states, power + _log_tilt(lam, _rewards(completions, reward_fn, states)))


class ValueFunction(NamedTuple):
    """The exact future value of the target π ∝ p^α exp(λ r) at every prefix.

    For a prefix h (no stop token before its last position, at most N tokens), with y
    ranging over the completions extending h:

      log_twist[h] = log ψ*(h) = log Σ_y p(y_{>|h|} | h)^α · exp(λ r(y))
                     Zhao et al.'s optimal twist: the expected terminal potential; exp(λ r(h))
                     once h is finished; ψ*(∅) = Z.
      log_value[h] = log V(h) = log ψ*(h) − λ r(h)
                     the lookahead value of `jaxsample.smc` (π_t ∝ γ_t V_t is π's marginal);
                     0 once h is finished.

    Identities (checked by the tests): ψ*(h) = Σ_v p(v | h)^α ψ*(h v) for open h, and the
    optimal proposal q*(v | h) = p(v | h)^α ψ*(h v) / ψ*(h) makes every SMC weight equal Z.

    Attributes:
      log_twist, log_value: `{prefix: float}` over every such prefix.
      vocab_size, max_new_tokens: the enumeration's V and N.
      log_z: log Z = log ψ*(∅).
    """

    log_twist: dict
    log_value: dict
    vocab_size: int
    max_new_tokens: int
    log_z: float

    def next_log_twist(self, prefix: Prefix) -> np.ndarray:
        """float64 `[V]` log ψ*(h v) for every next token v of an open prefix h: the table a
        twist head outputs in one pass."""
        prefix = tuple(prefix)
        return np.array([self.log_twist[prefix + (v,)] for v in range(self.vocab_size)])

    def optimal_proposal_log_probs(self, completions: Enumeration, prefix: Prefix,
                                   alpha: float) -> np.ndarray:
        """float64 `[V]` log q*(v | h) = α log p(v | h) + log ψ*(h v) − log ψ*(h)."""
        log_p = completions.next_log_probs(prefix)
        power = np.where(np.isneginf(log_p), -np.inf, alpha * log_p)
        return power + self.next_log_twist(prefix) - self.log_twist[tuple(prefix)]

    def log_value_fn(self) -> PrefixFn:
        """`(tokens [W], length []) -> log V` as a JAX function: pass it as
        `smc_decode(..., lookahead=...)` for the exact-value lookahead."""
        return prefix_table_fn(self.log_value, self.vocab_size, self.max_new_tokens)

    def next_log_twist_fn(self) -> PrefixFn:
        """`(tokens [W], length []) -> log ψ*(h v) [V]` for the prefix h = tokens[:length] (an
        exact twist head for twisted SMC; rows of finished prefixes are 0)."""
        zeros = np.zeros(self.vocab_size)
        def row(prefix):
            is_open = prefix + (0,) in self.log_twist  # only open prefixes have extensions
            return self.next_log_twist(prefix) if is_open else zeros

        return prefix_table_fn(row, self.vocab_size, self.max_new_tokens - 1)


def value_function(completions: Enumeration, reward_fn: Optional[RewardFn] = None,
                   alpha: float = 1.0, lam: float = 0.0) -> ValueFunction:
    """The exact optimal twist ψ* and lookahead value V of π ∝ p^α exp(λ r) (see
    `ValueFunction`), by one backward pass over the completion tree."""
    if reward_fn is None and lam != 0:
        raise ArgumentError(f"lam={lam} has no effect without a reward_fn")
    # Every prefix that can occur: open prefixes and their one-token extensions.
    prefixes = [()] + [h + (v,) for h in completions.logits for v in range(completions.vocab_size)]
    rewards = dict(zip(prefixes, _rewards(completions, reward_fn, prefixes)))
    log_twist, log_value = {}, {}
    for prefix in sorted(prefixes, key=len, reverse=True):
        tilt = float(_log_tilt(lam, np.array([rewards[prefix]]))[0])
        if completions.is_finished(prefix):
            log_twist[prefix], log_value[prefix] = tilt, 0.0
            continue
        log_p = completions.next_log_probs(prefix)
        power = np.where(np.isneginf(log_p), -np.inf, alpha * log_p)
        children = np.array([log_twist[prefix + (v,)] for v in range(completions.vocab_size)])
        log_twist[prefix] = float(scipy.special.logsumexp(power + children))
        log_value[prefix] = log_twist[prefix] - tilt
    return ValueFunction(log_twist, log_value, completions.vocab_size, completions.max_new_tokens,
                         log_twist[()])
