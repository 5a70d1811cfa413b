"""Task data is drawn in NumPy (fast batches); every draw still comes from an explicit seed."""

from __future__ import annotations

import jax
import numpy as np

from jaxsample.errors import ArgumentError


def numpy_rng(rng) -> np.random.Generator:
    """A NumPy generator from a Generator (returned as is), an int seed or a JAX PRNG key."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    if isinstance(rng, jax.Array):
        if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        return np.random.default_rng(np.asarray(rng, np.uint32).ravel())
    raise ArgumentError(
        f"rng must be a numpy Generator, an int seed or a JAX key, got {type(rng).__name__}")
