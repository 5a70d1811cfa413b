"""Self-improvement loops under a gate: θ_{n+1} = θ' if the gate accepts θ' = propose(θ_n), else θ_n.

Reconstruction (spec §2.2, §2.5): the proposer pushes the parameters toward reward, adds a
"temptation" push toward the unsafe region with some probability, and noise; step lengths are
log-uniform, so some proposals are tiny and some overshoot any certified ball.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxsample.errors import ArgumentError
from jaxsample.safety.gate import Gate, distance_in_radii
from jaxsample.validation import check_int, check_real

Array = jax.Array


class SelfImprovementProblem(NamedTuple):
    """A self-improving system.

    Attributes:
      params: θ_0, a params pytree.
      propose: `(key, params) -> candidate params`.
      reward: `params -> scalar` (higher is better).
      safety: `params -> scalar`; safe iff ≥ 0.
    """

    params: Any
    propose: Callable
    reward: Callable
    safety: Callable


class Trace(NamedTuple):
    """Per-iteration record of a gated run, every field `[num_steps]`.

    Attributes:
      accepted: the gate accepted this iteration's proposal.
      proposal_safe: the proposal was safe (oracle audit).
      reward: reward of the current params after the iteration.
      true_accepts, false_accepts, transitions: the gate's cumulative counts.
      distance: ‖θ − θ_0‖ / r_0 of the current params (0 at θ_0 even when r_0 = 0; see
        `distance_in_radii`).
      margin: the gate's margin at its centre.
      proposal: the flattened proposal `[num_steps, d]` with `record_proposals`, else None.
    """

    accepted: Array
    proposal_safe: Array
    reward: Array
    true_accepts: Array
    false_accepts: Array
    transitions: Array
    distance: Array
    margin: Array
    proposal: Array | None = None


def gradient_proposal(
    reward_fn: Callable,
    temptation,
    *,
    step_range: tuple[float, float],
    temptation_probability: float,
    temptation_size: float,
    noise: float,
) -> Callable:
    """`propose(key, params)`: θ + ε ∇R/‖∇R‖ + B·γ·t̂ + σ ξ/√d.

    ε log-uniform on `step_range`, B ~ Bernoulli(`temptation_probability`), γ =
    `temptation_size`, t̂ the unit `temptation` direction (a params pytree pointing toward the
    unsafe region), ξ standard normal, σ = `noise` (the expected noise norm).
    """
    low, high = step_range
    check_real("step_range[0]", low, "(0, inf)")
    check_real("step_range[1]", high, f"[{low}, inf)")
    check_real("temptation_probability", temptation_probability, "[0, 1]")
    check_real("temptation_size", temptation_size, "[0, inf)")
    check_real("noise", noise, "[0, inf)")
    direction, _ = ravel_pytree(temptation)
    norm = jnp.linalg.norm(direction)
    if not norm > 0:
        raise ArgumentError(f"temptation must be a non-zero direction, got norm {float(norm)}")
    direction = direction / norm

    def propose(key, params):
        flat, unravel = ravel_pytree(params)
        # Draws and arithmetic in the params' precision (at least float32): the default dtype
        # would follow jax_enable_x64, giving other draws and float64 proposals whose carry
        # no longer matches the float32 params in `simulate`'s scan.
        dtype = jnp.promote_types(flat.dtype, jnp.float32)
        gradient = ravel_pytree(jax.grad(reward_fn)(params))[0].astype(dtype)
        step_key, tempt_key, noise_key = jax.random.split(key, 3)
        log_low, log_high = jnp.log(jnp.asarray(low, dtype)), jnp.log(jnp.asarray(high, dtype))
        step = jnp.exp(jax.random.uniform(step_key, (), dtype, log_low, log_high))
        tempted = jax.random.bernoulli(tempt_key, jnp.asarray(temptation_probability, dtype))
        ascent = gradient / jnp.maximum(jnp.linalg.norm(gradient), 1e-12)
        push = jnp.where(tempted, jnp.asarray(temptation_size, dtype), 0) * direction.astype(dtype)
        normal = jax.random.normal(noise_key, flat.shape, dtype)
        jitter = jnp.asarray(noise, dtype) * normal / jnp.sqrt(jnp.asarray(flat.shape[0], dtype))
        return unravel((flat + step * ascent + push + jitter).astype(flat.dtype))

    return propose


def simulate(
    key: Array, problem: SelfImprovementProblem, gate: Gate, num_steps: int, record_proposals: bool = False
) -> Trace:
    """Runs `num_steps` gated iterations in one `lax.scan` (vmap over keys for many runs).

    `record_proposals` also keeps every proposal (the ones a gate faces, e.g. to calibrate a
    classifier on them); off by default, since it stores `num_steps · d` floats per run.

    Returns:
      A `Trace` with `[num_steps]` fields.
    """
    num_steps = check_int("num_steps", num_steps, 1)
    state = gate.init(problem.params)

    def body(carry, step_key):
        params, state = carry
        candidate = problem.propose(step_key, params)
        accepted, state = gate.accept(state, candidate)
        params = jax.tree.map(lambda new, old: jnp.where(accepted, new, old), candidate, params)
        flat, _ = ravel_pytree(params)
        record = Trace(
            accepted=accepted,
            proposal_safe=problem.safety(candidate) >= 0,
            reward=problem.reward(params),
            true_accepts=state.true_accepts,
            false_accepts=state.false_accepts,
            transitions=state.transitions,
            distance=distance_in_radii(flat, state.origin, state.initial_radius),
            margin=state.margin,
            proposal=ravel_pytree(candidate)[0] if record_proposals else None,
        )
        return (params, state), record

    _, trace = jax.lax.scan(body, (problem.params, state), jax.random.split(key, num_steps))
    return trace


def proposal_dataset(key: Array, problem: SelfImprovementProblem, num_runs: int, num_steps: int) -> tuple[Array, Array]:
    """Labelled proposals for training classifier gates: ungated runs (every proposal taken).

    Returns:
      `(candidates [num_runs · num_steps, d], safe bool [num_runs · num_steps])`.
    """
    num_runs = check_int("num_runs", num_runs, 1)
    num_steps = check_int("num_steps", num_steps, 1)

    def run(run_key):
        def body(params, step_key):
            candidate = problem.propose(step_key, params)
            return candidate, (ravel_pytree(candidate)[0], problem.safety(candidate) >= 0)

        return jax.lax.scan(body, problem.params, jax.random.split(run_key, num_steps))[1]

    candidates, safe = jax.jit(jax.vmap(run))(jax.random.split(key, num_runs))
    return candidates.reshape(-1, candidates.shape[-1]), safe.reshape(-1)
