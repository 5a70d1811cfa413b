"""Open-loop steering baselines in the same `Intervention` API as A-LQR: ActAdd (a constant
vector at one layer) and a constant mean-difference vector at every layer.

Not implemented: S-PID (u_k = K_p e_k + K_i Σ_{j≤k} e_j + K_d Δe_k across layers) needs the
errors of earlier layers at the same position, a state the position-wise intervention does
not carry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsample.errors import ArgumentError
from jaxsample.models.intervention import Intervention

Array = jax.Array


def add_vector(layer, h, vectors):
    """Adds row `layer` of `vectors [L, D]` to block `layer`'s output."""
    return h + vectors[layer].astype(h.dtype)


def actadd_intervention(E: Array, layer: int, coefficient, positions: str = "last") -> Intervention:
    """ActAdd: u = c · E_layer added after one block (E `[L(+1), D]` contrastive directions,
    c traced)."""
    E = jnp.asarray(E)
    if not 0 <= layer < E.shape[0]:
        raise ArgumentError(f"layer must be in [0, {E.shape[0]}), got {layer}")
    vectors = jnp.zeros_like(E).at[layer].set(coefficient * E[layer])
    return Intervention(add_vector, vectors, (int(layer),), positions)


def mean_difference_intervention(E: Array, coefficient, num_layers: int, positions: str = "last") -> Intervention:
    """A constant mean-difference vector at every block: u_k = c · E_k / ‖E_k‖."""
    E = jnp.asarray(E)[:num_layers]
    vectors = coefficient * E / jnp.linalg.norm(E, axis=-1, keepdims=True)
    return Intervention(add_vector, vectors, tuple(range(num_layers)), positions)
