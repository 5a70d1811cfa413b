"""Simulator 1: a self-improving controller θ ∈ R^d with a known MLP safety function.

Reconstruction (spec §2.1-2.2; the paper's controller and its rollouts are not public): the
safety function is a fixed one-hidden-layer tanh network of the parameters,
s(θ) = m_0 + w_2ᵀ (tanh(W_1 θ + b_1) − tanh(b_1)), so s(0) = m_0 and its analytic Lipschitz
bound ‖w_2‖ ‖W_1‖₂ is exact to compute. W_1's columns come in groups of decreasing scale, so
some parameter groups barely affect safety (the per-group verifier's case). The reward
R(θ) = gᵀθ − ‖θ‖²/(2ρ) points partly toward the unsafe side (g has a component along the
temptation direction t = −∇s(0)/‖∇s(0)‖), so the safety constraint binds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.safety.lipschitz import LipschitzBound, mlp_lipschitz_bound
from jaxsample.safety.simulate import SelfImprovementProblem, gradient_proposal
from jaxsample.validation import check_int, check_real

Array = jax.Array


class Controller(NamedTuple):
    """A controller problem with its safety network.

    Attributes:
      problem: the `SelfImprovementProblem` (θ_0 = 0, `[d]`).
      weights: `[W_1 [h, d], w_2 [1, h]]`, the safety network's layers.
      group_ids: int `[d]`, the column group of every parameter.
      bound: the analytic `LipschitzBound` (scalar).
      group_bound: the analytic per-group `LipschitzBound` (`[G]`).
    """

    problem: SelfImprovementProblem
    weights: list
    group_ids: np.ndarray
    bound: LipschitzBound
    group_bound: LipschitzBound


def safety_network(weights, bias, margin):
    """s(θ) = margin + w_2ᵀ (tanh(W_1 θ + b_1) − tanh(b_1))."""
    first, second = weights

    def safety(theta):
        return margin + second[0] @ (jnp.tanh(first @ theta + bias) - jnp.tanh(bias))

    return safety


def controller_problem(
    key: Array,
    dim: int,
    *,
    hidden: int = 32,
    num_groups: int = 4,
    group_scale_ratio: float = 0.3,
    margin: float = 1.0,
    reward_tilt: float = 0.3,
    reward_range: float = 20.0,
    temptation_probability: float = 0.3,
) -> Controller:
    """A controller of dimension `dim` (spec: d ∈ {84, 240, 768}).

    Proposal scales are set by the single-ball radius r_0 = m_0 / L: step lengths log-uniform on
    [0.02 r_0, 2 r_0], temptation pushes of 2 r_0 toward the unsafe side, noise 0.05 r_0.

    Args:
      key: PRNG key of the safety network and the reward direction.
      dim: d, parameters.
      hidden: the safety network's width.
      num_groups: G, parameter groups; group g's columns are scaled by `group_scale_ratio`^g.
      margin: m_0 = s(0) > 0.
      reward_tilt: component of the reward direction along the temptation direction.
      reward_range: ρ, the reward's curvature radius.
      temptation_probability: chance that a proposal carries a temptation push.
    """
    dim = check_int("dim", dim, 1)
    hidden = check_int("hidden", hidden, 1)
    num_groups = check_int("num_groups", num_groups, 1, dim)
    check_real("group_scale_ratio", group_scale_ratio, "(0, 1]")
    check_real("margin", margin, "(0, inf)")
    check_real("reward_tilt", reward_tilt, "[0, inf)")
    check_real("reward_range", reward_range, "(0, inf)")
    w_key, b_key, v_key, u_key = jax.random.split(key, 4)
    group_ids = np.repeat(np.arange(num_groups), -(-dim // num_groups))[:dim]
    column_scale = jnp.asarray(group_scale_ratio ** group_ids, jnp.float32)
    first = jax.random.normal(w_key, (hidden, dim), jnp.float32) * column_scale / jnp.sqrt(jnp.sum(column_scale**2))
    second = jax.random.normal(v_key, (1, hidden), jnp.float32) / jnp.sqrt(hidden)
    bias = 0.5 * jax.random.normal(b_key, (hidden,), jnp.float32)
    weights = [first, second]
    safety = safety_network(weights, bias, margin)

    theta0 = jnp.zeros(dim, jnp.float32)
    toward_unsafe = -jax.grad(safety)(theta0)
    toward_unsafe /= jnp.linalg.norm(toward_unsafe)
    other = jax.random.normal(u_key, (dim,), jnp.float32)
    other -= (other @ toward_unsafe) * toward_unsafe
    direction = other / jnp.linalg.norm(other) + reward_tilt * toward_unsafe
    direction /= jnp.linalg.norm(direction)

    def reward(theta):
        return direction @ theta - theta @ theta / (2 * reward_range)

    bound = mlp_lipschitz_bound(weights)
    radius = margin / float(bound.value)
    propose = gradient_proposal(
        reward, toward_unsafe, step_range=(0.02 * radius, 2 * radius),
        temptation_probability=temptation_probability, temptation_size=2 * radius, noise=0.05 * radius,
    )
    return Controller(
        problem=SelfImprovementProblem(theta0, propose, reward, safety),
        weights=weights,
        group_ids=group_ids,
        bound=bound,
        group_bound=mlp_lipschitz_bound(weights, group_ids=group_ids),
    )
