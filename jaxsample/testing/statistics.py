"""Statistical assertions whose tolerances are derived from the sample size.

**TV bound for independent samples** (`chain_histogram_tv`, `assert_tv_below`). Let the n
rows be i.i.d. draws from an unknown law ℓ over the S states of a target π, with
TV(ℓ, π) ≤ b (b = `bias`: 0 claims the samples come from π itself; pass the exact mixing
error, e.g. TV(`sampler_law(...)`, π), for a finite-step sampler). With p̂ the histogram:

1. Mean. E|p̂_i − ℓ_i| ≤ sd(p̂_i) = sqrt(ℓ_i (1 − ℓ_i) / n) (Jensen), so
   E TV(p̂, ℓ) ≤ ½ Σ_i sqrt(ℓ_i (1 − ℓ_i) / n). Since |sqrt(a(1−a)) − sqrt(c(1−c))| ≤ sqrt|a − c|
   and Σ_i sqrt|ℓ_i − π_i| ≤ sqrt(S · 2b) (Cauchy–Schwarz), this is at most
   μ = [Σ_i sqrt(π_i (1 − π_i)) + sqrt(2 S b)] / (2 sqrt(n)).
2. Deviation. Replacing one sample moves TV(p̂, ℓ) by at most 1/n, so McDiarmid's inequality
   gives P(TV(p̂, ℓ) ≥ μ + t) ≤ exp(−2 n t²): t = sqrt(log(1/δ) / (2n)) at failure
   probability δ (`failure_prob`, default 1e-6).
3. Triangle inequality: with probability ≥ 1 − δ, TV(p̂, π) ≤ b + μ + t =: bound.

A correct sampler therefore fails `assert_tv_below` with probability at most δ (the test is
valid for any S and n, and conservative); a sampler whose law is further than the bound from
π fails it. The rows must be independent: one final state per chain, not the steps of one
chain.

**Unbiasedness** (`assert_unbiased`): Student's t-test of each column's mean with the sample
standard deviation, |mean − exact| ≤ t · sd / sqrt(n) (+ `atol`), t the two-sided
quantile of Student's t with n − 1 degrees of freedom at `failure_prob` / columns
(Bonferroni). For normal estimates an unbiased estimator then fails with probability at most
`failure_prob`, for any n ≥ 2. For skewed estimates, such as Ẑ / Z, whose right tail is heavy,
this holds only once the mean is near normal: the error of the normal approximation shrinks
like skewness / sqrt(n) (Berry–Esseen), so use hundreds of estimates, not tens.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import scipy.stats

from jaxsample.errors import ArgumentError, VerificationError
from jaxsample.testing.targets import Distribution
from jaxsample.validation import check_real


def total_variation(p, q) -> float:
    """½ Σ |p − q| of two laws over the same states (arrays or `Distribution`s), in [0, 1].

    Each law is divided by its total first: laws exact up to rounding (`power_target` at
    α = 1000 sums to 1 + 1e-14) gave TV > 1 on nearly disjoint supports, which
    `chain_histogram_tv` then refused as a bias. What rounding the normalised sums keep
    (an ulp) is clipped. Rounding-size negative entries, as in a least-squares
    `stationary_distribution`, are taken as they are.
    """
    p, q = _normalised("p", p), _normalised("q", q)
    if p.shape != q.shape:
        raise ArgumentError(f"laws over different state counts: {p.shape} vs {q.shape}")
    return min(0.5 * float(np.abs(p - q).sum()), 1.0)


def _normalised(name: str, law) -> np.ndarray:
    probs = np.asarray(getattr(law, "probs", law), np.float64)
    total = probs.sum()
    if not 0 < total < np.inf:
        raise ArgumentError(f"{name} must be a law with a positive finite total, got total {float(total)!r}")
    return probs / total


def _rows(samples) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(samples, "tokens") and hasattr(samples, "lengths"):
        tokens, lengths = samples.tokens, samples.lengths
    else:
        tokens, lengths = samples
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ArgumentError(f"samples must be tokens [n, N] with lengths [n], got {tokens.shape} "
                            f"and {lengths.shape}")
    return tokens, lengths


def empirical_distribution(samples, states: Sequence[tuple], weights=None) -> Distribution:
    """The (weighted) histogram of sample rows over `states`.

    Args:
      samples: a sampler result with `.tokens [n, N]` and `.lengths [n]` (`PowerSampleResult`,
        `GenerateResult`, `SMCResult`), or a `(tokens, lengths)` pair.
      states: the state list (e.g. `target.states`); every row must be one of them.
      weights: optional float `[n]` (normalised here), e.g. SMC's particle weights.
    """
    tokens, lengths = _rows(samples)
    index = {tuple(state): s for s, state in enumerate(states)}
    rows = []
    for r, (row, length) in enumerate(zip(tokens, lengths)):
        state = tuple(int(t) for t in row[:length])
        if state not in index:
            raise VerificationError(f"sample {r} is {state}, which is not a state of the target "
                                    f"({len(states)} states, e.g. {states[0]})")
        rows.append(index[state])
    weights = np.ones(len(rows)) if weights is None else np.asarray(weights, np.float64)
    counts = np.bincount(rows, weights=weights, minlength=len(states))
    return Distribution(tuple(states), counts / counts.sum())


class TVCheck(NamedTuple):
    """The TV distance of a histogram to its target and the bound it should stay under.

    Attributes:
      tv: TV(p̂, π).
      bound: b + μ + t (module docstring); `tv ≤ bound` with probability ≥ 1 − δ when the
        samples come from a law within b of π.
      mean_bound: μ, the bound on E TV(p̂, ℓ) (the noise floor).
      deviation: t, McDiarmid's deviation at failure probability δ.
      bias: b.
      num_samples: n.
      empirical: p̂ over the target's states.
    """

    tv: float
    bound: float
    mean_bound: float
    deviation: float
    bias: float
    num_samples: int
    empirical: Distribution


def chain_histogram_tv(samples, target: Distribution, bias: float = 0.0,
                       failure_prob: float = 1e-6) -> TVCheck:
    """TV between the histogram of independent samples (one row per chain) and `target`,
    with the Monte Carlo bound derived in the module docstring.

    Args:
      samples: a sampler result with `.tokens` / `.lengths`, or `(tokens, lengths)`.
      target: the law the samples should follow (`power_target`, `sampler_law`, ...).
      bias: b ≥ 0, the largest TV(ℓ, π) the sampler's own law ℓ is allowed (its mixing
        error; 0 for an exact sampler).
      failure_prob: δ in (0, 1), the probability that a correct sampler exceeds the bound.
    """
    if not 0 < failure_prob < 1:
        raise ArgumentError(f"failure_prob must lie in (0, 1), got {failure_prob}")
    if not 0 <= bias <= 1:
        raise ArgumentError(f"bias must lie in [0, 1], got {bias}")
    empirical = empirical_distribution(samples, target.states)
    n = _rows(samples)[0].shape[0]
    pi = np.asarray(target.probs, np.float64)
    spread = np.sum(np.sqrt(pi * (1 - pi))) + np.sqrt(2 * len(pi) * bias)
    mean_bound = spread / (2 * np.sqrt(n))
    deviation = np.sqrt(np.log(1 / failure_prob) / (2 * n))
    return TVCheck(total_variation(empirical, target), float(bias + mean_bound + deviation),
                   float(mean_bound), float(deviation), float(bias), n, empirical)


def assert_tv_below(samples, target: Distribution, bias: float = 0.0,
                    failure_prob: float = 1e-6) -> TVCheck:
    """Asserts TV(histogram, target) ≤ the bound of `chain_histogram_tv`; returns the check.

    Raises:
      VerificationError with the TV, the bound's parts and the states whose frequencies are
      furthest from the target.
    """
    check = chain_histogram_tv(samples, target, bias, failure_prob)
    if check.tv > check.bound:
        gap = check.empirical.probs - target.probs
        worst = np.argsort(-np.abs(gap))[:3]
        states = ", ".join(f"{target.states[s]}: {check.empirical.probs[s]:.4f} vs "
                           f"{target.probs[s]:.4f}" for s in worst)
        raise VerificationError(
            f"the samples are too far from the target: TV = {check.tv:.4f} > bound "
            f"{check.bound:.4f} (n = {check.num_samples} independent samples; noise floor "
            f"{check.mean_bound:.4f} + deviation {check.deviation:.4f} at failure probability "
            f"{failure_prob:g} + allowed bias {check.bias:.4f}); largest gaps (sampled vs "
            f"target): {states}"
        )
    return check


class Unbiasedness(NamedTuple):
    """Attributes: mean `[...]`, standard_error `[...]` of the estimates, z = (mean −
    exact) / standard_error, and threshold, the |z| allowed (the t quantile)."""

    mean: np.ndarray
    standard_error: np.ndarray
    z: np.ndarray
    threshold: float


def assert_unbiased(estimates, exact, failure_prob: float = 1e-4, atol: float = 0.0) -> Unbiasedness:
    """Asserts that independent estimates average to `exact`: a t-test per column (module
    docstring) that an unbiased estimator fails with probability ≤ `failure_prob`.

    Args:
      estimates: float `[n, ...]`, n ≥ 2 independent estimates (e.g. Ẑ / Z over SMC seeds),
        all finite.
      exact: the exact value, scalar or `[...]` (one per column).
      failure_prob: the false-alarm probability over all columns, in (0, 1).
      atol: an absolute slack added to the t bound, for estimators whose spread can be 0
        (every estimate equal, up to float rounding).

    Raises:
      VerificationError naming the worst column, its mean, exact value and standard error.
    """
    check_real("failure_prob", failure_prob, "(0, 1)")
    check_real("atol", atol, "[0, inf)")
    estimates = np.asarray(estimates, np.float64)
    if estimates.ndim < 1 or estimates.shape[0] < 2:
        raise ArgumentError(f"estimates must be [n, ...] with n >= 2, got shape {estimates.shape}")
    if not np.isfinite(estimates).all():
        raise ArgumentError(f"estimates hold {int((~np.isfinite(estimates)).sum())} non-finite values")
    num = estimates.shape[0]
    exact = np.broadcast_to(np.asarray(exact, np.float64), estimates.shape[1:])
    mean = estimates.mean(axis=0)
    se = estimates.std(axis=0, ddof=1) / np.sqrt(num)
    threshold = float(scipy.stats.t.isf(failure_prob / (2 * max(exact.size, 1)), num - 1))
    excess = np.abs(mean - exact) - atol
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(mean == exact, 0.0, (mean - exact) / se)  # ±inf when se = 0
        scaled = np.where(excess <= 0, 0.0, excess / se)
    worst = np.unravel_index(np.argmax(scaled), scaled.shape) if scaled.ndim else ()
    if scaled[worst] > threshold:
        where = f" at index {tuple(int(i) for i in worst)}" if scaled.ndim else ""
        slack = f" + atol {atol:g}" if atol else ""
        raise VerificationError(
            f"the estimates are biased{where}: mean {mean[worst]:.6g} vs exact {exact[worst]:.6g}, "
            f"|difference| = {abs(z[worst]):.1f} standard errors > {threshold:.2f}{slack} (standard error "
            f"{se[worst]:.3g} from n = {num} estimates; t quantile at failure_prob {failure_prob:g})"
        )
    return Unbiasedness(mean, se, z, threshold)
