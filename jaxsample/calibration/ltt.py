"""Learn-then-Test pieces: binomial p-values and fixed-sequence testing.

Angelopoulos, Bates, Candès, Jordan, Lei, "Learn then Test" [standard]. Both the LTT
baseline of CSA and ORCA's stopping-threshold calibration use these two functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def binomial_p_value(num_losses, num_trials, level) -> Array:
    """p = P(Bin(n, level) ≤ s): small when s losses in n trials are too few for a risk > level.

    The p-value of H: risk > level for binary losses (exact binomial tail, via the regularised
    incomplete beta function). n = 0 gives 1 (no evidence).

    Args:
      num_losses: s, number of losses (int or float array).
      num_trials: n ≥ s, same shape (broadcasts).
      level: the risk level under test, in (0, 1).
    """
    s = jnp.asarray(num_losses, jnp.float32)
    n = jnp.asarray(num_trials, jnp.float32)
    below = s < n
    tail = jax.scipy.special.betainc(jnp.where(below, n - s, 1.0), s + 1.0, 1.0 - jnp.asarray(level, jnp.float32))
    return jnp.where(below, tail, 1.0)


def fixed_sequence(p_values, delta) -> Array:
    """Fixed-sequence test: reject in order while p ≤ δ; the index of the last rejected
    hypothesis (strict LTT), int32 `[]`, or −1 when the first one is not rejected.

    Args:
      p_values: `[J]` p-values in testing order (most conservative first).
      delta: family-wise error level.
    """
    rejected_prefix = jnp.cumprod(jnp.asarray(p_values) <= delta)
    return (jnp.sum(rejected_prefix) - 1).astype(jnp.int32)
