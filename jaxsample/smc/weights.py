"""Log-weight arithmetic and the ESS-conditional resampling step.

Normaliser convention (LLaMPPL): log-weights start at 0 and, at every resampling, all are
reset to `LSE(lw) - log N`. Then `log Z_hat = LSE(lw) - log N` at any time, with no separate
running sum to keep in step with the weights.

Compensated running weights: a step adds its increments to the pair `(log_weights, residual)`
with `two_sum`, whose sum is the running log-weight to about 2⁻⁴⁸ of its magnitude. A
float32 log-weight alone rounds every increment to half its ulp (0.004 at 1e5, 0.5 at
1e7), so a large offset that enters the weights and later leaves them (a constant in a
twist or a value) erased the increments added in between. `centered` then gives the small
log-weights that the ESS, resampling and log Z_hat are computed from.

Degenerate weights: when every log-weight is `-inf` no particle is possible. `ess` is then 0,
`log_evidence` is `-inf`, normalised log-weights stay `-inf` (never NaN) and
`resample_if_needed` leaves the particles untouched. NaN or +inf log-weights are an error:
they are never resampled over, and `resample_if_needed` reports them so the caller can raise
`NumericalError` outside `jit`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.errors import ArgumentError
from jaxsample.rows import gather_rows
from jaxsample.smc.resampling import Resampler, get_resampler

Array = jax.Array


def _logsumexp(x: Array) -> Array:
    # jax.nn.logsumexp is already -inf (not NaN) for an all -inf input.
    return jax.nn.logsumexp(x, axis=-1)


def _shift_by_max(log_weights: Array) -> tuple[Array, Array]:
    """`(lw - max, max)`: both results below are shift invariant, and subtracting the max
    first keeps the float32 rounding of large log-weights (ulp(1e4) ~ 1e-3) out of them."""
    log_weights = jnp.asarray(log_weights, jnp.float32)
    top = jnp.max(log_weights, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return log_weights - top, top


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """`(s, e)`: s = a + b rounded and e its rounding error, s + e = a + b exactly (Knuth's
    TwoSum, any order of magnitude); e = 0 where s is ±inf or NaN, which s carries on."""
    s = a + b
    b_rounded = s - a
    error = (a - (s - b_rounded)) + (b - b_rounded)
    return s, jnp.where(jnp.isfinite(s), error, 0.0)


def add_log_weights(log_weights: Array, residual: Array, *increments: Array) -> tuple[Array, Array]:
    """The running log-weights `log_weights + residual` plus every increment, as a new pair
    `(log_weights, residual)` with `log_weights` the float32 rounding of the sum; each
    increment is added exactly (`two_sum`), so a large one does not round the small ones."""
    for increment in increments:
        log_weights, error = two_sum(log_weights, increment)
        residual = residual + error
    return two_sum(log_weights, residual)


def centered(log_weights: Array, residual: Array) -> tuple[Array, Array]:
    """`(lw + residual − top, top)` with top = max lw (0 if not finite), f32 `[N]` and `[]`:
    the running log-weights less one common offset, small enough near the maximum for
    float32 to resolve the differences that the ESS, resampling and log Z_hat depend on."""
    shifted, top = _shift_by_max(log_weights)
    return shifted + residual, top[..., 0]


@jax.jit
def normalize_log_weights(log_weights: Array) -> tuple[Array, Array]:
    """Self-normalised log-weights.

    Args:
      log_weights: f32 `[..., N]`; `-inf` entries are legal.
    Returns:
      `(log_W [..., N], log_total [...])` with `log_W = lw - LSE(lw)` and `log_total = LSE(lw)`.
      All `-inf` when every weight is `-inf`.
    """
    shifted, top = _shift_by_max(log_weights)
    log_shifted_total = _logsumexp(shifted)
    safe_total = jnp.where(jnp.isneginf(log_shifted_total), 0.0, log_shifted_total)
    return shifted - safe_total[..., None], log_shifted_total + top[..., 0]


@jax.jit
def ess(log_weights: Array) -> Array:
    """Effective sample size `1 / sum W_i^2 = (sum w_i)^2 / sum w_i^2`, in `[1, N]`.

    Computed from `w = exp(lw - max lw)`: the largest weight is 1, so neither sum overflows
    and the weights too small to register beside it are the ones that do not change the ESS.
    Equal weights give exactly N (through `exp(LSE)` they gave N(1 ± 1e-7), and N = 13 fell
    below κN at κ = 1). 0 when every weight is `-inf`, NaN when any log-weight is NaN.

    Args:
      log_weights: f32 `[..., N]` unnormalised log-weights.
    Returns:
      f32 `[...]`.
    """
    shifted, _ = _shift_by_max(log_weights)
    weights = jnp.exp(shifted)
    total = jnp.sum(weights, axis=-1)
    # total · (total / Σw²) rather than total² / Σw²: the ratio of equal sums is exactly 1.
    return jnp.where(total == 0, 0.0, total * (total / jnp.sum(weights * weights, axis=-1)))


@jax.jit
def log_evidence(log_weights: Array) -> Array:
    """`log Z_hat = LSE(lw) - log N` under the reset-at-resampling convention; f32 `[...]`."""
    log_weights = jnp.asarray(log_weights, jnp.float32)
    return _logsumexp(log_weights) - jnp.log(jnp.float32(log_weights.shape[-1]))


class ResampleInfo(NamedTuple):
    """What `resample_if_needed` did (fields per group `[P]` when the weights are `[P, N]`).

    Attributes:
      ancestors: int32 `[N]` (`[P, N]`, within each group); `arange(N)` when not resampled.
      ess: f32 `[]`, the ESS of the incoming weights (the resampling criterion).
      resampled: bool `[]`.
      num_unique: int32 `[]`, distinct ancestors (N when not resampled). ESS resets to N
        after resampling even if the ancestry collapsed; this does not.
      all_zero: bool `[]`, every incoming log-weight was `-inf` (log Z_hat = -inf).
      nan_or_inf: bool `[]`, some incoming log-weight was NaN or +inf (an error for the caller).
    """

    ancestors: Array
    ess: Array
    resampled: Array
    num_unique: Array
    all_zero: Array
    nan_or_inf: Array


def gather_particles(particles: Any, ancestors: Array) -> Any:
    """Every per-particle leaf indexed by `ancestors` along its leading axis; `Shared` parts
    (the prompt cache) stay as they are, and large leaves are gathered in place
    (`jaxsample.rows.gather_rows`)."""
    return gather_rows(particles, ancestors)


def resample_if_needed(
    key: Array,
    log_weights: Array,
    particles: Any,
    ess_threshold: float | Array,
    resampler: str | Resampler,
) -> tuple[Any, Array, ResampleInfo]:
    """Resamples when `ESS < ess_threshold * N`, then resets every log-weight to `LSE - log N`.

    Every per-particle leaf (KV cache, tokens, lengths, cumulative scores, stored values...)
    is gathered by the ancestors, the identity where no group resamples. The KV cache is
    gathered in place, a slice at a time, and not at all when no group resamples; the shared
    prompt cache is never gathered. There is no `lax.cond` around the gather: XLA:GPU
    gives a KV cache that passes through a conditional a second buffer.

    Groups: with `[P, N]` log-weights and P keys, the particles are P groups of N (one per
    prompt, group-major rows), and each group is resampled, or not, on its own ESS, from
    its own key, among its own particles: group p draws what one group alone would with
    `key[p]`. The resampler is vmapped over the groups.

    Args:
      key: PRNG key for the resampler; P keys (typed `[P]` or raw `[P, 2]`) for P groups.
      log_weights: f32 `[N]` unnormalised log-weights, or `[P, N]` for P groups.
      particles: pytree whose leaves all have leading axis N (P·N for P groups).
      ess_threshold: kappa in [0, 1]; may be traced. 0 never resamples, 1 resamples whenever
        the weights are not all equal.
      resampler: a `RESAMPLERS` name or a `(key, weights [N], N) -> ancestors [N]` function
        (static).
    Returns:
      `(particles, log_weights, ResampleInfo)`, the weights in the shape given.
    """
    log_weights = jnp.asarray(log_weights, jnp.float32)
    grouped = log_weights.ndim == 2
    if not grouped:
        key, log_weights = jnp.expand_dims(key, 0), log_weights[None]
    if key.shape[0] != log_weights.shape[0]:
        raise ArgumentError(
            f"resample_if_needed: {key.shape[0]} keys for {log_weights.shape[0]} groups of particles")
    particles, log_weights, info = _resample_if_needed(
        key, log_weights, particles, ess_threshold, get_resampler(resampler))
    if grouped:
        return particles, log_weights, info
    return particles, log_weights[0], jax.tree.map(lambda x: x[0], info)


@partial(jax.jit, static_argnames="resampler")
def _resample_if_needed(keys, log_weights, particles, ess_threshold, resampler):
    num_groups, num_particles = log_weights.shape
    identity = jnp.broadcast_to(jnp.arange(num_particles, dtype=jnp.int32), log_weights.shape)
    log_total = _logsumexp(log_weights)
    nan_or_inf = jnp.any(jnp.isnan(log_weights) | jnp.isposinf(log_weights), axis=-1)
    all_zero = jnp.isneginf(log_total) & ~nan_or_inf
    current_ess = ess(log_weights)
    resample = (current_ess < ess_threshold * num_particles) & ~all_zero & ~nan_or_inf

    # Groups that keep their particles draw from uniform weights, never from the NaNs of
    # an all-zero or invalid group, and keep the identity.
    weights = jnp.where(resample[:, None], jnp.exp(log_weights - log_total[:, None]), 1.0 / num_particles)
    drawn = jax.vmap(lambda key, w: resampler(key, w, num_particles))(keys, weights)
    ancestors = jnp.where(resample[:, None], drawn, identity)
    log_weights = jnp.where(
        resample[:, None], (log_total - jnp.log(jnp.float32(num_particles)))[:, None], log_weights)
    first_row = num_particles * jnp.arange(num_groups, dtype=jnp.int32)[:, None]
    particles = gather_particles(particles, (first_row + ancestors).reshape(-1))
    counts = jax.vmap(lambda a: jnp.zeros(num_particles, jnp.int32).at[a].set(1))(ancestors)
    info = ResampleInfo(
        ancestors=ancestors,
        ess=current_ess,
        resampled=resample,
        num_unique=jnp.sum(counts, axis=-1),
        all_zero=all_zero,
        nan_or_inf=nan_or_inf,
    )
    return particles, log_weights, info
