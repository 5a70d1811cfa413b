"""Safety gates for self-improving updates: the Lipschitz-ball verifier, ball chaining, per-group balls.

Reconstruction of Scrivens, "Empirical Validation of the Classification-Verification Dichotomy
for AI Safety Gates" (arXiv 2604.00072, spec §2.2-2.3): only the abstract is public, so the
definitions below are ours. A self-improving system proposes θ' = θ_n + Δ_n; the gate accepts
or rejects. θ is safe iff s(θ) ≥ τ for an oracle s. The ball verifier certifies a centre c
(margin m = s(c) − τ, one oracle call) and accepts iff ‖θ' − c‖₂ ≤ m / L; if L is a valid
Lipschitz constant, s(θ') ≥ s(c) − L‖θ' − c‖ ≥ τ, so no accepted point is unsafe. Chaining
re-centres at every accepted point after re-measuring its margin and its local bound; the
per-group verifier accepts iff Σ_g L_g ‖Δ_g‖₂ ≤ m.

Every gate has the same interface over any params pytree (flattened with `ravel_pytree`):

    gate = ball_gate(safety_fn, bound, chain=True)
    state = gate.init(params)
    accepted, state = gate.accept(state, candidate_params)     # pure, jit/vmap/scan-able

To report false accepts, `accept` evaluates the oracle at the candidate (an audit; for chaining
it is also the re-measurement at the new centre, the chain's one oracle call per transition).
The decision itself uses only the centre's margin and the bound.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxsample.errors import ArgumentError
from jaxsample.safety.lipschitz import LipschitzBound, check_group_ids

Array = jax.Array


class GateState(NamedTuple):
    """A gate's state.

    Attributes:
      centre: `[d]` the certified centre c (classifier gates: the last accepted params).
      origin: `[d]` the initial params θ_0.
      margin: `[]` m = s(c) − τ (NaN for classifier gates).
      lipschitz: `[]` or `[G]` the bound at the centre (NaN for classifier gates).
      radius: `[]` or `[G]` m / L (per group: how far group g alone may move).
      initial_radius: `[]` r_0 = m_0 / ‖L_0‖₂, the unit of `distance` (0 for a start on the
        boundary, m_0 = 0: a legal, safe start whose ball is the single point θ_0).
      step: int32 `[]` proposals seen.
      true_accepts: int32 `[]` accepted safe proposals.
      false_accepts: int32 `[]` accepted unsafe proposals (s(θ') < τ).
      transitions: int32 `[]` re-centrings (chaining only).
      distance: `[]` ‖θ_accepted − θ_0‖₂ / r_0 of the last accepted point (`distance_in_radii`).
    """

    centre: Array
    origin: Array
    margin: Array
    lipschitz: Array
    radius: Array
    initial_radius: Array
    step: Array
    true_accepts: Array
    false_accepts: Array
    transitions: Array
    distance: Array


class Gate(NamedTuple):
    """`init(params) -> GateState`; `accept(state, candidate) -> (accepted bool[], GateState)`."""

    init: Callable
    accept: Callable


def _safe_ratio(numerator: Array, denominator: Array) -> Array:
    """m / L, with L = 0 (a constant s) giving inf and an invalid L (negative, NaN) giving 0:
    an invalid bound certifies nothing."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), jnp.where(denominator == 0, jnp.inf, 0.0))


def distance_in_radii(flat: Array, origin: Array, initial_radius: Array) -> Array:
    """‖flat − origin‖₂ / r_0. With r_0 = 0 (a start with margin 0) θ_0 itself is at distance 0
    and any other point at inf, not 0/0 = NaN: a chain re-accepting its centre has not moved."""
    norm = jnp.linalg.norm(flat - origin)
    return jnp.where(norm == 0, 0.0, norm / initial_radius)


def record_decision(state: GateState, flat: Array, accepted: Array, candidate_margin: Array) -> GateState:
    """Bookkeeping shared by every gate. A NaN margin counts as unsafe."""
    unsafe = ~(candidate_margin >= 0)
    distance = distance_in_radii(flat, state.origin, state.initial_radius)
    return state._replace(
        step=state.step + 1,
        true_accepts=state.true_accepts + (accepted & ~unsafe),
        false_accepts=state.false_accepts + (accepted & unsafe),
        distance=jnp.where(accepted, distance, state.distance),
    )


def initial_state(flat: Array, margin: Array, lipschitz: Array, initial_radius: Array) -> GateState:
    zero = jnp.zeros((), jnp.int32)
    return GateState(
        centre=flat,
        origin=flat,
        margin=margin,
        lipschitz=lipschitz,
        radius=_safe_ratio(margin, lipschitz),
        initial_radius=initial_radius,
        step=zero,
        true_accepts=zero,
        false_accepts=zero,
        transitions=zero,
        distance=jnp.zeros((), jnp.float32),
    )


def ball_gate(
    safety_fn: Callable,
    bound: LipschitzBound | Callable,
    *,
    threshold: float = 0.0,
    chain: bool = False,
    group_ids=None,
) -> Gate:
    """The Lipschitz-ball verifier (chain=False), ball chaining (chain=True), per-group balls.

    Accept iff L ‖θ' − c‖₂ ≤ m (i.e. ‖θ' − c‖ ≤ r = m / L), or with `group_ids` iff
    Σ_g L_g ‖Δ_g‖₂ ≤ m. m = s(c) − τ is measured by the oracle at the centre. Sound (no false
    accept) whenever the bound is a valid Lipschitz bound on the region: unconditionally for an
    `"analytic"` bound, conditionally for an `"estimated"` one.

    With `chain=True`, an accepted θ' whose re-measured margin is ≥ 0 becomes the new centre,
    with its own margin and local bound `bound(θ')`; an accepted point found unsafe (possible
    only with an invalid bound) is counted as a false accept and not re-centred on.

    Args:
      safety_fn: params pytree → scalar s(θ); θ is safe iff s(θ) ≥ threshold.
      bound: a `LipschitzBound`, or `params -> LipschitzBound` (the local bound at a centre).
        Value `[]`, or `[G]` with `group_ids`.
      threshold: τ.
      chain: re-centre at accepted points.
      group_ids: optional int `[d]` (concrete): the group of every flattened parameter.

    Returns:
      A `Gate`.
    """
    bound_fn = bound if callable(bound) else (lambda params: bound)
    ids = None if group_ids is None else jnp.asarray(group_ids)
    # segment_sum drops ids past the bound's length: their parameters would move for free.
    bound_shape = () if group_ids is None else (int(np.max(group_ids, initial=-1)) + 1,)

    def measure(params):
        flat, _ = ravel_pytree(params)
        flat = flat.astype(jnp.float32)
        margin = jnp.asarray(safety_fn(params), jnp.float32) - threshold
        value = jnp.asarray(bound_fn(params).value, jnp.float32)
        if value.shape != bound_shape:
            need = "a single ball needs a scalar bound (one bound per group needs group_ids)" if ids is None else (
                f"group_ids name groups 0..{bound_shape[0] - 1}, so the bound needs shape {bound_shape}"
            )
            raise ArgumentError(f"bound has shape {value.shape}; {need}")
        return flat, margin, value

    def init(params) -> GateState:
        if group_ids is not None:
            check_group_ids(group_ids, ravel_pytree(params)[0].shape[0])
        flat, margin, value = measure(params)
        return initial_state(flat, margin, value, _safe_ratio(margin, jnp.linalg.norm(value)))

    def cost(state: GateState, flat: Array) -> Array:
        delta = flat - state.centre
        if ids is None:
            return state.lipschitz * jnp.linalg.norm(delta)
        group_norms = jnp.sqrt(jax.ops.segment_sum(delta**2, ids, state.lipschitz.shape[0]))
        return jnp.sum(state.lipschitz * group_norms)

    def accept(state: GateState, candidate) -> tuple[Array, GateState]:
        flat, _ = ravel_pytree(candidate)
        flat = flat.astype(jnp.float32)
        # Bounds computed under jit (a chain's local bounds) escape LipschitzBound's check, and a
        # negative one would make the cost negative, i.e. accept anything.
        valid_bound = jnp.all(state.lipschitz >= 0)
        accepted = (cost(state, flat) <= state.margin) & valid_bound
        candidate_margin = jnp.asarray(safety_fn(candidate), jnp.float32) - threshold
        new_state = record_decision(state, flat, accepted, candidate_margin)
        if not chain:
            return accepted, new_state

        def recentre(s: GateState) -> GateState:
            value = jnp.asarray(bound_fn(candidate).value, jnp.float32)
            return s._replace(
                centre=flat,
                margin=candidate_margin,
                lipschitz=value,
                radius=_safe_ratio(candidate_margin, value),
                transitions=s.transitions + 1,
            )

        return accepted, jax.lax.cond(accepted & (candidate_margin >= 0), recentre, lambda s: s, new_state)

    return Gate(init, accept)
