"""The exact transition matrix of the power-MH move on a tabular toy model.

Every state, cut and proposal suffix is enumerated with its probability, and log r comes
from the library's own `log_acceptance_ratio` (evaluated in float64), so the matrix is the
kernel the sampler implements, up to the decoder that draws the cut and the suffix.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import numpy as np

from jaxsample.mcmc import Trace, log_acceptance_ratio
from toy_models import TabularLM

# (cut [M], alpha, current Trace [M], proposed Trace [M], cut_law) -> log r [M]
RatioFn = Callable[..., jax.Array]


def ratio_components(cut, alpha, current, proposed, cut_law):
    """The library's `LogRatio` for a batch of moves."""
    ratio = jax.vmap(lambda i, x, y: log_acceptance_ratio(i, alpha, x, y, cut_law))
    return ratio(cut, current, proposed)


def library_ratio(cut, alpha, current, proposed, cut_law):
    return ratio_components(cut, alpha, current, proposed, cut_law).log_ratio


@partial(jax.jit, static_argnames="cut_law")
def _cut_log_probs(traces, cut_law):
    return jax.vmap(lambda trace: trace.cut_log_probs(cut_law))(traces)


@partial(jax.jit, static_argnames=("cut_law", "ratio"))
def _ratios(cut, alpha, current, proposed, cut_law, ratio):
    return ratio(cut, alpha, current, proposed, cut_law)


class ExactChain(NamedTuple):
    """Attributes:
      states: the completions (tuples of token ids).
      log_p: float64 `[S]` log p of each state.
      log_start: float64 `[S]` log-probability of sampling the state from the proposal.
      traces: the states' `Trace`s (float64, `[S, cap]`).
      transition: float64 `[S, S]`, P[x, x'].
    """

    states: list
    log_p: np.ndarray
    log_start: np.ndarray
    traces: Trace
    transition: np.ndarray


def _traces(toy: TabularLM, states, cap, next_log_q) -> Trace:
    def padded(values):
        return np.pad(values, (0, cap - len(values)))

    per_token = [toy.per_token(x, next_log_q) for x in states]
    return Trace(
        tokens=np.array([padded(np.array(x)) for x in states]),
        log_p=np.array([padded(v["log_p"]) for v in per_token]),
        log_q=np.array([padded(v["log_q"]) for v in per_token]),
        entropy=np.array([padded(v["entropy"]) for v in per_token]),
        length=np.array([len(x) for x in states]),
    )


class Moves(NamedTuple):
    """Every possible move x → x' with cut i (M moves over S states).

    Attributes:
      states: the completions (tuples of token ids), S of them.
      traces: the states' `Trace`s, float64 `[S, cap]`.
      current, proposed, cut: int `[M]` state indices of x and x', and the cut i.
      log_prob: float64 `[M]` log c(i | x) + log Q(x'_{i:} | x_{<i}) (all finite).
    """

    states: list
    traces: Trace
    current: np.ndarray
    proposed: np.ndarray
    cut: np.ndarray
    log_prob: np.ndarray


def enumerate_moves(toy: TabularLM, cut_law, temperature: float = 1.0, top_k: int = 0,
                    cap: int | None = None) -> Moves:
    """All moves "cut i ~ c(· | x), new suffix from q up to `cap`" of positive probability."""
    cap = toy.cap if cap is None else cap
    states = toy.completions(cap)

    def next_log_q(prefix):
        return toy.log_q(prefix, temperature, top_k)

    traces = _traces(toy, states, cap, next_log_q)
    length = traces.length
    with jax.enable_x64(True):
        log_c = np.asarray(_cut_log_probs(traces, cut_law))

    # x' shares x's first i tokens and resamples from i (i < n, n').
    tokens = np.array([list(x) + [-1] * (cap - len(x)) for x in states])
    same = tokens[:, None, :] == tokens[None, :, :]
    shared = np.cumprod(same, axis=-1).sum(-1)  # common-prefix length
    cuts = np.arange(cap)
    valid = ((cuts[None, None, :] <= shared[:, :, None])
             & (cuts[None, None, :] < length[:, None, None])
             & (cuts[None, None, :] < length[None, :, None]))
    x, y, i = np.nonzero(valid)
    suffix = np.arange(cap)[None, :] >= i[:, None]
    log_prob = log_c[x, i] + np.sum(np.where(suffix, traces.log_q[y], 0.0), axis=1)
    # Moves of probability 0 (a cut c(i | x) = 0, a suffix outside top-k) never happen.
    possible = np.isfinite(log_prob)
    return Moves(states, traces, x[possible], y[possible], i[possible], log_prob[possible])


def move_log_ratios(moves: Moves, alpha: float, cut_law, ratio: RatioFn = library_ratio):
    """`ratio` evaluated on every move, in float64."""
    current = jax.tree.map(lambda a: a[moves.current], moves.traces)
    proposed = jax.tree.map(lambda a: a[moves.proposed], moves.traces)
    with jax.enable_x64(True):
        return np.asarray(_ratios(moves.cut, alpha, current, proposed, cut_law, ratio))


def exact_chain(toy: TabularLM, alpha: float, cut_law, temperature: float = 1.0,
                top_k: int = 0, cap: int | None = None,
                ratio: RatioFn = library_ratio) -> ExactChain:
    """Builds P for the move "cut i ~ c(· | x), new suffix from q up to `cap`" accepted
    with `ratio` (default: the library's); the rejected mass sits on the diagonal."""
    moves = enumerate_moves(toy, cut_law, temperature, top_k, cap)
    log_r = move_log_ratios(moves, alpha, cut_law, ratio)
    x, y = moves.current, moves.proposed
    move = np.exp(moves.log_prob)
    accept = np.exp(np.minimum(log_r, 0.0))
    transition = np.zeros((len(moves.states),) * 2)
    np.add.at(transition, (x, y), move * accept)
    np.add.at(transition, (x, x), move * (1.0 - accept))
    traces = moves.traces
    log_start = np.sum(traces.log_q, axis=1)  # pads hold 0
    return ExactChain(moves.states, traces.log_p.sum(1), log_start, traces, transition)


def stationary(transition: np.ndarray) -> np.ndarray:
    """The stationary distribution of an irreducible stochastic matrix (least squares on
    vP = v, Σv = 1)."""
    size = transition.shape[0]
    system = np.vstack([transition.T - np.eye(size), np.ones((1, size))])
    rhs = np.concatenate([np.zeros(size), [1.0]])
    return np.linalg.lstsq(system, rhs, rcond=None)[0]


def sampler_law(toy: TabularLM, alpha: float, cut_law, temperature: float, block_size: int,
                num_steps: int, freeze_finished: bool = True) -> dict:
    """Exact law of the block-wise sampler's output: `{completion: probability}`.

    Block k extends unterminated completions from q to cap (k+1)·block_size, applies its
    kernel `num_steps` times, and (`freeze_finished`) freezes the completions that hold a
    stop token.
    """
    frozen: dict = {}
    active = {(): 1.0}
    for cap in range(block_size, toy.cap + 1, block_size):
        chain = exact_chain(toy, alpha, cut_law, temperature, cap=cap)
        index = {state: s for s, state in enumerate(chain.states)}
        law = np.zeros(len(chain.states))
        for prefix, mass in active.items():
            start = len(prefix)
            for state in toy.completions(cap, prefix):
                log_q = toy.sequence_log_prob(
                    state, start, lambda h: toy.log_q(h, temperature))
                law[index[state]] += mass * np.exp(log_q)
        law = law @ np.linalg.matrix_power(chain.transition, num_steps)
        active = {}
        for state, mass in zip(chain.states, law):
            target = frozen if freeze_finished and state[-1] == toy.eos else active
            target[state] = target.get(state, 0.0) + mass
    return {**frozen, **active}
