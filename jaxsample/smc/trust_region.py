"""The trust-region step of TRI-TSMC: tempered path weights and the β that meets a KL budget.

**Reconstruction.** Only the abstract of TRI-TSMC (Wang, Yang, Deng, Xu; arXiv 2605.25123) was
available: each iteration takes an "exact KL-constrained update in path space" that "admits a
closed-form solution by tempered importance reweighting". The formulas below are our
reconstruction from standard SMC theory (shared/specs/smc.md §3), not the paper's text.

For paths X^i ~ Q_k with log-weights lw_i = log P*(X^i) − log Q_k(X^i), the update

    min_Q KL(Q ‖ P*)  subject to  KL(Q ‖ Q_k) ≤ ε

is Q̃_β ∝ Q_k^{1−β} (P*)^β with β = 1/(1+μ) ∈ (0, 1] (μ the multiplier); on the samples it is
the tempered weighting W̄(β) = softmax(β lw). Its KL to Q_k, estimated on the same samples, is

    KL(β) = Σ_i W̄_i log(N W̄_i) = log N − H(W̄(β)),

non-decreasing in β (dH/dβ = −β Var_W̄(lw) ≤ 0). β is 1 when KL(1) ≤ ε, else the root of
KL(β) = ε, found by a fixed number of bisection halvings (blackjax's `ess_solver` finds an
ESS target by bisection; here the target is a KL). Equivalently the entropy-ESS exp(H)
equals N e^{−ε}.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.validation import check_real

Array = jax.Array

# float32 bisection on [0, 1] stops gaining precision after ~30 halvings.
_MAX_BISECTIONS = 40


def tempered_log_weights(log_weights: Array, beta: Array | float) -> Array:
    """log W̄(β) = log softmax(β lw), f32 `[N]`; `-inf` weights stay `-inf` (also at β = 0)."""
    log_weights = jnp.asarray(log_weights, jnp.float32)
    scaled = jnp.where(jnp.isneginf(log_weights), -jnp.inf, beta * log_weights)
    return jax.nn.log_softmax(scaled)


def trust_region_kl(log_weights: Array, beta: Array | float) -> Array:
    """KL(Q̃_β ‖ Q_k) ≈ log N − H(softmax(β lw)), f32 `[]` (0 at β = 0 with finite weights).

    Paths with weight `-inf` get W̄ = 0 for every β, so KL(β) ≥ log(N / #finite).
    """
    log_w = tempered_log_weights(log_weights, beta)
    entropy = -jnp.sum(jnp.where(jnp.isneginf(log_w), 0.0, jnp.exp(log_w) * log_w))
    return jnp.log(jnp.float32(log_w.shape[0])) - entropy


def _check(log_weights, kl_budget) -> None:
    check_real("kl_budget", kl_budget, "(0, inf)")
    if jnp.ndim(log_weights) != 1 or jnp.shape(log_weights)[0] < 1:
        raise ArgumentError(f"log_weights must have shape [N], got {jnp.shape(log_weights)}")
    if not isinstance(log_weights, jax.core.Tracer):
        host = np.asarray(log_weights, np.float64)
        if np.isnan(host).any() or np.isposinf(host).any():
            raise NumericalError("log_weights contain NaN or +inf")
        if np.isneginf(host).all():
            raise NumericalError("every log-weight is -inf: no path to reweight")


@jax.jit
def bisect_beta(log_weights: Array, kl_budget: Array) -> Array:
    """`solve_trust_region_beta` without the host-side checks (jit / vmap friendly).

    A fixed number of halvings, with no data-dependent exit: under `vmap` a while-loop's exit
    test (any row unresolved) and its per-row select are compiled apart, and where
    |KL(mid) − ε| sits at the tolerance they can round differently, so that a row counts as
    unresolved to the loop and as resolved to the select, and the loop never ends.
    """
    kl = partial(trust_region_kl, log_weights)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = kl(mid) > kl_budget
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    lo, hi = jax.lax.fori_loop(0, _MAX_BISECTIONS, halve, (jnp.float32(0.0), jnp.float32(1.0)))
    return jnp.where(kl(1.0) <= kl_budget, 1.0, 0.5 * (lo + hi))


def solve_trust_region_beta(log_weights: Array, kl_budget: float | Array) -> Array:
    """The tempering β ∈ (0, 1] whose reweighting spends exactly the KL budget ε.

    Args:
      log_weights: f32 `[N]` path log-weights lw_i = log P*(X^i) − log Q_k(X^i) (up to a
        constant) of N paths drawn from the current proposal, e.g. from an SIS pass.
      kl_budget: ε > 0 (traced: changing it does not recompile).
    Returns:
      f32 `[]` β: 1 when KL(1) ≤ ε, else the root of KL(β) = ε to float32 resolution
      (40 halvings of [0, 1]). When ε is below the floor log(N / #finite weights) no β
      meets it and β comes out at the bisection's lower end (≈ 0).
    Raises:
      ArgumentError: ε not finite and positive, or log_weights not `[N]`.
      NumericalError: (concrete inputs) a NaN or +inf log-weight, or all `-inf`.
    """
    _check(log_weights, kl_budget)
    return bisect_beta(jnp.asarray(log_weights, jnp.float32), jnp.asarray(kl_budget, jnp.float32))
