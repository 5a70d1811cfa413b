"""Exact transition matrices of suffix-resampling MH kernels, and exact block-sampler laws.

A suffix-resampling move from state x (a completion of the block cap L): draw a cut
i ~ c(· | x), keep x_<i, draw a new suffix from the proposal q until a stop token or L,
accept the result x' with probability min(1, r). `mh_transition_matrix` enumerates every
(x, i, x') of positive probability on an `Enumeration`, evaluates the user's log r on all of
them in float64 (vmapped, jitted), and returns P with the rejected mass on the diagonal.
Because log r is the function under test, P is the kernel that function implements; only
the draw of the cut and of the suffix is taken as correct (it is the decoder's).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional, Union

import jax
import numpy as np

from jaxsample.errors import ArgumentError, VerificationError
from jaxsample.mcmc.acceptance import Trace, log_acceptance_ratio
from jaxsample.mcmc.cuts import CutLaw
from jaxsample.sampling import Proposal
from jaxsample.testing.enumeration import Enumeration, Prefix
from jaxsample.testing.targets import Distribution
from jaxsample.validation import check_int

# (cut int [], current Trace [N], proposed Trace [N]) -> log r []  (one move; vmapped here)
LogRatioFn = Callable[[jax.Array, Trace, Trace], jax.Array]


class PowerLogRatio(NamedTuple):
    """The library's exact log r for π ∝ p^α (`jaxsample.mcmc.log_acceptance_ratio`) as a
    `LogRatioFn`; hashable, so equal instances share one compiled program.

    Attributes:
      alpha: α, the power of the target (a Python float: part of the hash).
      cut_law: the `jaxsample.mcmc.CutLaw` c(i | x) whose ratio enters log r; hashable.
    """

    alpha: float
    cut_law: CutLaw

    def __call__(self, cut, current: Trace, proposed: Trace):
        return log_acceptance_ratio(cut, self.alpha, current, proposed, self.cut_law).log_ratio


def power_log_ratio(alpha: float, cut_law: CutLaw) -> PowerLogRatio:
    """The log acceptance ratio `power_sample` uses, for target p^α and cut law `cut_law`."""
    return PowerLogRatio(float(alpha), cut_law)


class ExactKernel(NamedTuple):
    """An MH kernel's exact transition matrix on an enumerated state space.

    Attributes:
      states: the S states (completions of the block cap).
      matrix: float64 `[S, S]`, P[x, x'].
      start_log_probs: float64 `[S]`, log-probability that the proposal, started from the
        prompt, draws each state (the chain's starting law; `-inf` marks states a truncated
        proposal cannot reach).
    """

    states: tuple[Prefix, ...]
    matrix: np.ndarray
    start_log_probs: np.ndarray

    def law_after(self, num_steps: int, start: Optional[np.ndarray] = None) -> Distribution:
        """The exact law after `num_steps` steps from `start` (default: the proposal's law)."""
        start = np.exp(self.start_log_probs) if start is None else np.asarray(start, np.float64)
        return Distribution(self.states, start @ np.linalg.matrix_power(self.matrix, num_steps))

    def reachable(self) -> np.ndarray:
        """bool `[S]`: the states the proposal can draw from the prompt."""
        return np.isfinite(self.start_log_probs)

    def restricted(self, keep) -> "ExactKernel":
        """The kernel on the states where `keep` (bool `[S]`) holds, e.g. the closed class a
        truncated proposal reaches (`reachable()`); rows lose the mass leaving the class, so
        `assert_stationary` flags a class that is not closed."""
        keep = np.asarray(keep, bool)
        states = tuple(x for x, k in zip(self.states, keep) if k)
        return ExactKernel(states, self.matrix[keep][:, keep], self.start_log_probs[keep])


@partial(jax.jit, static_argnames="cut_law")
def _cut_log_probs(traces: Trace, cut_law: CutLaw):
    return jax.vmap(lambda trace: trace.cut_log_probs(cut_law))(traces)


@partial(jax.jit, static_argnames="log_ratio_fn")
def _log_ratios(cut, current, proposed, log_ratio_fn):
    return jax.vmap(log_ratio_fn)(cut, current, proposed)


def _static(fn, name):
    try:
        hash(fn)
    except TypeError:
        raise ArgumentError(f"{name} must be hashable (a function, or a frozen dataclass / "
                            f"NamedTuple of hashable fields), got {fn!r}") from None
    return fn


class _Moves(NamedTuple):
    current: np.ndarray  # int [M] state index of x
    proposed: np.ndarray  # int [M] state index of x'
    cut: np.ndarray  # int [M]
    log_prob: np.ndarray  # float64 [M] log c(i | x) + log Q(x'_{i:} | x'_{<i}), finite


def _moves(states, traces: Trace, cut_law: CutLaw) -> _Moves:
    with jax.enable_x64(True):
        log_c = np.asarray(_cut_log_probs(traces, _static(cut_law, "cut_law")))
    if np.isnan(log_c).any():
        bad = states[int(np.argwhere(np.isnan(log_c))[0][0])]
        raise ArgumentError(f"the cut law returned NaN for state {bad}")
    width = traces.tokens.shape[1]
    tokens = np.array([list(x) + [-1] * (width - len(x)) for x in states])
    same = tokens[:, None, :] == tokens[None, :, :]
    shared = np.cumprod(same, axis=-1).sum(-1)  # common-prefix length of x and x'
    length = traces.length
    cuts = np.arange(width)
    # x' keeps x's first i tokens and resamples at least one: i ≤ shared, i < n, i < n'.
    valid = ((cuts[None, None, :] <= shared[:, :, None])
             & (cuts[None, None, :] < length[:, None, None])
             & (cuts[None, None, :] < length[None, :, None]))
    x, y, i = np.nonzero(valid)
    after = np.arange(width)[None, :] >= i[:, None]
    log_prob = log_c[x, i] + np.sum(np.where(after, traces.log_q[y], 0.0), axis=1)
    possible = np.isfinite(log_prob)  # a cut of probability 0, a suffix outside top-k
    return _Moves(x[possible], y[possible], i[possible], log_prob[possible])


def mh_transition_matrix(completions: Enumeration, cut_law: CutLaw, proposal: Proposal,
                         log_ratio_fn: LogRatioFn, cap: Optional[int] = None) -> ExactKernel:
    """The exact transition matrix of "cut i ~ c(· | x), new suffix from q up to the cap,
    accept with min(1, exp(log_ratio_fn(i, x, x')))".

    Args:
      completions: the enumeration (`enumerate_completions`).
      cut_law: the cut law the move draws from (`jaxsample.mcmc.cuts` signature).
      proposal: the proposal the suffix is drawn from (`jaxsample.Proposal`).
      log_ratio_fn: `(cut int [], current Trace [N], proposed Trace [N]) -> log r []` for one
        move; evaluated in float64 on every move. `power_log_ratio(α, cut_law)` is the
        library's. NaN means reject, as in the samplers. Must be hashable (a module-level
        function, or a `NamedTuple` / frozen dataclass holding its parameters).
      cap: the block cap L (default N): the states are the completions of cap L.

    Returns:
      `ExactKernel`: states, P `[S, S]` and the proposal's starting law.
    """
    proposal = proposal.validated()
    states = completions.states(cap)
    traces = completions.traces(states, proposal)
    moves = _moves(states, traces, cut_law)
    # Moves padded to a power of two (repeats of move 0): kernels of nearby sizes share one
    # compiled ratio.
    size = len(moves.cut)
    if not size:
        raise ArgumentError("the cut law gives no move of positive probability on any state")
    pad = np.zeros(1 << max(size - 1, 1).bit_length(), np.int64)
    pad[:size] = np.arange(size)
    current = jax.tree.map(lambda a: a[moves.current[pad]], traces)
    proposed = jax.tree.map(lambda a: a[moves.proposed[pad]], traces)
    with jax.enable_x64(True):  # numpy float64 leaves stay float64 when traced
        log_r = _log_ratios(moves.cut[pad], current, proposed, _static(log_ratio_fn, "log_ratio_fn"))
        log_r = np.asarray(log_r, np.float64)[:size]
    if log_r.shape != moves.cut.shape:
        raise ArgumentError(f"log_ratio_fn must return a scalar per move, got shape {log_r.shape[1:]}")
    accept = np.exp(np.minimum(np.where(np.isnan(log_r), -np.inf, log_r), 0.0))
    move = np.exp(moves.log_prob)
    matrix = np.zeros((len(states),) * 2)
    np.add.at(matrix, (moves.current, moves.proposed), move * accept)
    np.add.at(matrix, (moves.current, moves.current), move * (1.0 - accept))
    start = np.array([completions.log_prob(x, proposal=proposal) for x in states])
    return ExactKernel(tuple(states), matrix, start)


def stationary_distribution(matrix: np.ndarray) -> np.ndarray:
    """float64 `[S]` stationary law of an irreducible stochastic matrix (least squares on
    vP = v, Σ v = 1)."""
    size = matrix.shape[0]
    system = np.vstack([matrix.T - np.eye(size), np.ones((1, size))])
    rhs = np.concatenate([np.zeros(size), [1.0]])
    return np.linalg.lstsq(system, rhs, rcond=None)[0]


def _unpack(kernel, target):
    matrix = np.asarray(getattr(kernel, "matrix", kernel), np.float64)
    pi = np.asarray(getattr(target, "probs", target), np.float64)
    states = getattr(kernel, "states", None) or getattr(target, "states", None)
    if (isinstance(kernel, ExactKernel) and isinstance(target, Distribution)
            and tuple(kernel.states) != tuple(target.states)):
        raise ArgumentError("the kernel and the target are over different state lists "
                            f"({len(kernel.states)} vs {len(target.states)} states); build both "
                            "with the same cap, or restrict them alike")
    if matrix.ndim != 2 or matrix.shape != (pi.shape[0],) * 2:
        raise ArgumentError(f"P must be [S, S] for a target of S = {pi.shape[0]} states, "
                            f"got {matrix.shape}")
    states = states if states is not None else tuple(range(pi.shape[0]))
    return matrix, pi, states


def assert_stationary(kernel: Union[ExactKernel, np.ndarray], target: Union[Distribution, np.ndarray],
                      atol: float = 1e-12) -> None:
    """Asserts that P is a stochastic matrix that leaves π invariant: P ≥ 0, every row sums
    to 1 and max_x |(πP)(x) − π(x)| ≤ atol.

    Args:
      kernel: an `ExactKernel` or a float `[S, S]` matrix.
      target: a `Distribution` or a float `[S]` law over the same states.
      atol: the tolerance (1e-12 suits float64 kernels on ~100 states).

    Raises:
      VerificationError naming the worst state: its row sum, or π(x), (πP)(x) and the
      difference, and how far the kernel's own stationary law lies from π.
    """
    matrix, pi, states = _unpack(kernel, target)
    if matrix.min() < -atol:
        x, y = np.unravel_index(np.argmin(matrix), matrix.shape)
        raise VerificationError(f"P has a negative entry P[{states[x]}, {states[y]}] = "
                                f"{matrix[x, y]:.3e}")
    rows = matrix.sum(axis=1)
    worst = int(np.argmax(np.abs(rows - 1.0)))
    if abs(rows[worst] - 1.0) > atol:
        raise VerificationError(f"P is not stochastic: the row of state {states[worst]} sums to "
                                f"{rows[worst]:.15f} (|1 − sum| = {abs(rows[worst] - 1):.3e} > "
                                f"atol {atol:.1e})")
    moved = pi @ matrix
    worst = int(np.argmax(np.abs(moved - pi)))
    error = abs(moved[worst] - pi[worst])
    if error > atol:
        drift = 0.5 * float(np.abs(stationary_distribution(matrix) - pi).sum())
        raise VerificationError(
            f"the kernel does not leave the target invariant: max_x |πP(x) − π(x)| = {error:.3e} "
            f"> atol {atol:.1e}, worst at state {states[worst]} (π = {pi[worst]:.6f}, "
            f"πP = {moved[worst]:.6f}); the kernel's own stationary law is at TV {drift:.4f} "
            f"from the target"
        )


def sampler_law(completions: Enumeration, cut_law: CutLaw, proposal: Proposal,
                log_ratio_fn: LogRatioFn, block_size: int, num_mcmc_steps: int,
                freeze_finished: bool = False) -> Distribution:
    """The exact law of a block-wise sampler's output (`power_sample`'s loop).

    Block k (cap L_k = (k+1)·block_size): every unterminated chain is extended from the
    proposal up to L_k, then the kernel of cap L_k is applied `num_mcmc_steps` times; with
    `freeze_finished` a chain holding a stop token after a block is frozen (Karan & Du's
    early stop), otherwise it keeps moving in later blocks.

    Args:
      completions: the enumeration; its N must be a multiple of `block_size`.
      cut_law, proposal, log_ratio_fn: the move, as in `mh_transition_matrix`.
      block_size: B ≥ 1.
      num_mcmc_steps: MH steps per block.
      freeze_finished: freeze finished chains after each block.

    Returns:
      The output law over `completions.states()`.
    """
    N = completions.max_new_tokens
    check_int("block_size", block_size, 1, N)
    if N % block_size:
        raise ArgumentError(f"block_size must divide max_new_tokens={N}, got {block_size}")
    check_int("num_mcmc_steps", num_mcmc_steps, 0)
    proposal = proposal.validated()
    frozen: dict = {}
    active = {(): 1.0}
    for cap in range(block_size, N + 1, block_size):
        kernel = mh_transition_matrix(completions, cut_law, proposal, log_ratio_fn, cap)
        index = {state: s for s, state in enumerate(kernel.states)}
        law = np.zeros(len(kernel.states))
        for prefix, mass in active.items():
            for state in completions.states(cap, prefix):
                log_q = completions.log_prob(state, len(prefix), proposal)
                law[index[state]] += mass * np.exp(log_q)
        law = kernel.law_after(num_mcmc_steps, law).probs
        active = {}
        for state, mass in zip(kernel.states, law):
            finished = bool(state) and state[-1] in completions.eos_token_ids
            bucket = frozen if freeze_finished and finished else active
            bucket[state] = bucket.get(state, 0.0) + mass
    laws = {**frozen, **active}
    states = completions.states()
    return Distribution(tuple(states), np.array([laws.get(x, 0.0) for x in states]))
