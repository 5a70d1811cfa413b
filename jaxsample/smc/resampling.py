"""Resampling schemes: `(key, weights [N], num_samples) -> ancestors int32 [num_samples]`.

All four schemes are unbiased: the expected number of copies of particle i is
`num_samples * W_i` with `W = weights / sum(weights)`. Each maps uniforms through the inverse
CDF of `W` with `searchsorted`; the CDF is divided by its last entry so it ends at exactly 1.0
and a particle of weight zero is never selected, even at the float32 end of the CDF.
Shapes are static (`num_samples` is a Python int), so the schemes work under `jit` and `vmap`.

Scale. Before the float32 CDF is built, the weights are multiplied by the power of two that
brings their maximum into [0.5, 1), in their own dtype (exact): finite weights whose float32
total overflows (`[3e38, 3e38, 0]`) and float64 weights below float32's range
(`exp([-200, -199])`) resample as their ratios say.

Invalid weights. Weights must be finite and non-negative with a positive total. When they
are concrete (an eager call), a NaN or infinite weight raises `NumericalError`, an all-zero
vector (no particle is possible) raises `NumericalError`, and a negative weight raises
`ArgumentError`; these checks see the weights in their own dtype. Under `jit` nothing can raise: invalid weights give
the identity ancestors `arange(num_samples) % N`, and the caller detects the condition from
the log-weights (the SMC step skips resampling, reports `log_z = -inf` for all-zero weights
and flags NaN / +inf; see `weights.py`).

Variance (Douc, Cappé & Moulines 2005): stratified and residual are never worse than
multinomial; systematic is usually best but carries no such guarantee. The SMC default is
systematic.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.validation import check_int

Array = jax.Array


class Resampler(Protocol):
    """A resampling scheme: any callable with this `__call__` (`multinomial`, `stratified`,
    `systematic`, `residual`, or your own); `get_resampler` accepts one in place of a name."""

    def __call__(self, key: Array, weights: Array, num_samples: int, /) -> Array:
        """Ancestor indices drawn in proportion to `weights`.

        Args:
          key: PRNG key.
          weights: float `[N]` unnormalised, finite, non-negative, with a positive total.
          num_samples: M, a Python int (static under `jit`).

        Returns:
          int32 `[M]` ancestor indices in [0, N). SMC's estimates stay unbiased when particle
          i appears M · w_i / Σw times in expectation, as in every scheme here. Must run
          under `jit` and `vmap`; the built-in schemes return `arange(M) % N` for invalid
          traced weights (see the module docstring).
        """
        ...

# float32 u_m = (m + U) / M can round up to 1.0; keep every uniform strictly inside [0, 1).
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def _check(weights: Array, num_samples: int) -> Array:
    """Raises on bad arguments; returns traced weights as they are and concrete ones scaled on
    the host (see Scale), since jit would first cast float64 weights to float32."""
    check_int("num_samples", num_samples, 1)
    if jnp.ndim(weights) != 1 or jnp.shape(weights)[0] < 1:
        raise ArgumentError(f"weights must have shape [N] with N >= 1, got {jnp.shape(weights)}")
    if isinstance(weights, jax.core.Tracer):
        return weights
    # On the host in their own dtype: JAX would cast float64 weights to float32 (without
    # x64), flushing small ones to 0 and large ones to inf.
    host = np.asarray(weights)
    if host.dtype.kind != "f" or host.dtype.itemsize < 4:
        host = host.astype(np.float32)
    if np.isnan(host).any():
        bad = np.flatnonzero(np.isnan(host))
        raise NumericalError(
            f"resampling weights contain NaN ({bad.size} of {host.size}, first at index {bad[0]})"
        )
    if np.isinf(host).any():
        first = np.flatnonzero(np.isinf(host))[0]
        raise NumericalError(f"resampling weights contain inf (first at index {first})")
    if (host < 0).any():
        raise ArgumentError(f"resampling weights must be non-negative, got min {host.min()}")
    if not (host > 0).any():
        raise NumericalError(
            "all resampling weights are zero: no particle can be selected (every "
            "log-weight is -inf, or exp(log-weights) underflowed: subtract their max first); the "
            "SMC step skips resampling in this case and reports log_z = -inf"
        )
    return np.ldexp(host, -np.frexp(host.max())[1])


def _rescaled(weights: Array) -> Array:
    """float32 weights, max in [0.5, 1): multiplied by a power of two in their own dtype.

    Exact unless a weight falls below float32's range relative to the maximum (it becomes 0).
    Signs, NaN and inf are kept, so invalid weights stay invalid.
    """
    if not jnp.issubdtype(weights.dtype, jnp.floating) or weights.dtype.itemsize < 4:
        weights = weights.astype(jnp.float32)
    _, exponent = jnp.frexp(jnp.max(weights))
    return jnp.ldexp(weights, -exponent).astype(jnp.float32)


def _validated(scheme: Resampler) -> Resampler:
    """Checks the arguments (raising on concrete invalid weights), then runs the jitted scheme."""
    jitted = jax.jit(lambda key, weights, n: scheme(key, _rescaled(weights), n), static_argnums=2)

    @functools.wraps(scheme)
    def resample(key: Array, weights: Array, num_samples: int) -> Array:
        return jitted(key, _check(weights, num_samples), int(num_samples))

    return resample


def _valid(weights: Array) -> Array:
    """The one traced validity test of every scheme: finite, non-negative, positive total.

    It must test the weights themselves: after normalisation, all-negative weights (log-weights
    passed by mistake) look like valid probabilities.
    """
    return jnp.all(jnp.isfinite(weights)) & jnp.all(weights >= 0) & (jnp.sum(weights) > 0)


def _inverse_cdf(weights: Array, uniforms: Array) -> Array:
    """Ancestor of each uniform in [0, 1); identity ancestors when the weights are invalid."""
    num_particles = weights.shape[0]
    cumulative = jnp.cumsum(weights)
    total = cumulative[-1]
    valid = _valid(weights)
    # Dividing by the cumsum's own last entry (not a separately rounded sum) makes the CDF
    # exactly 1.0 from the last positive weight on, so trailing zero weights get no mass.
    cdf = cumulative / jnp.where(valid, total, 1.0)
    uniforms = jnp.minimum(uniforms, _BELOW_ONE)
    ancestors = jnp.searchsorted(cdf, uniforms, side="right").astype(jnp.int32)
    ancestors = jnp.minimum(ancestors, num_particles - 1)
    identity = jnp.arange(uniforms.shape[0], dtype=jnp.int32) % num_particles
    return jnp.where(valid, ancestors, identity)


@_validated
def multinomial(key: Array, weights: Array, num_samples: int) -> Array:
    """`num_samples` i.i.d. draws from `W`. The highest-variance scheme.

    Args:
      key: PRNG key.
      weights: f32 `[N]`, non-negative, positive total (need not be normalised).
      num_samples: M, static.
    Returns:
      int32 `[M]` ancestor indices.
    """
    return _inverse_cdf(weights, jax.random.uniform(key, (num_samples,), jnp.float32))


@_validated
def stratified(key: Array, weights: Array, num_samples: int) -> Array:
    """One uniform in each stratum `[m/M, (m+1)/M)`, independently: `u_m = (m + U_m) / M`.

    Args/Returns: as `multinomial`; the ancestors come out sorted.
    """
    offsets = jax.random.uniform(key, (num_samples,), jnp.float32)
    return _inverse_cdf(weights, (jnp.arange(num_samples) + offsets) / num_samples)


@_validated
def systematic(key: Array, weights: Array, num_samples: int) -> Array:
    """One shared offset for all strata: `u_m = (m + U) / M`.

    Args/Returns: as `multinomial`; the ancestors come out sorted.
    """
    offset = jax.random.uniform(key, (), jnp.float32)
    return _inverse_cdf(weights, (jnp.arange(num_samples) + offset) / num_samples)


@_validated
def residual(key: Array, weights: Array, num_samples: int) -> Array:
    """`floor(M W_i)` deterministic copies of i, the remaining R slots multinomial.

    The remainder is drawn from `(M W_i - floor(M W_i)) / R`. Shapes stay static: M residual
    draws are always made and slot m takes a residual draw exactly when m >= M - R (the
    deterministic copies fill the first M - R slots via `jnp.repeat` with a fixed total
    length), so no dynamic-size array is ever built.

    Args/Returns: as `multinomial`.
    """
    num_particles = weights.shape[0]
    probs = weights / jnp.sum(weights)
    scaled = num_samples * probs
    copies = jnp.floor(scaled).astype(jnp.int32)
    num_copies = jnp.minimum(jnp.sum(copies), num_samples)
    fractional = scaled - copies
    # If rounding left no fractional mass at all, every slot is deterministic anyway; the
    # placeholder weights only keep the residual draw well defined.
    has_remainder = jnp.sum(fractional) > 0
    fractional = jnp.where(has_remainder, fractional, probs)
    residual_draws = _inverse_cdf(fractional, jax.random.uniform(key, (num_samples,), jnp.float32))
    deterministic = jnp.repeat(
        jnp.arange(num_particles, dtype=jnp.int32), copies, total_repeat_length=num_samples
    )
    slot = jnp.arange(num_samples)
    ancestors = jnp.where(slot < num_copies, deterministic, residual_draws)
    return jnp.where(_valid(weights), ancestors, slot.astype(jnp.int32) % num_particles)


def conditional_multinomial(key: Array, weights: Array, num_samples: int) -> Array:
    """Conditional resampling of conditional SMC: slot 0 (the reference) keeps ancestor 0,
    slots 1..M−1 are i.i.d. draws from `W`. Args/Returns: as `multinomial`."""
    return multinomial(key, weights, num_samples).at[0].set(0)


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(resampler: str | Resampler) -> Resampler:
    """A resampler by name (`RESAMPLERS` keys) or a callable with the same signature."""
    if callable(resampler):
        return resampler
    if resampler not in RESAMPLERS:
        raise ArgumentError(f"unknown resampler {resampler!r}; choose one of {sorted(RESAMPLERS)}")
    return RESAMPLERS[resampler]
