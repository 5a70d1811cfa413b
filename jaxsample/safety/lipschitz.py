"""Lipschitz bounds for safety functions s(θ): analytic (unconditional) or sampled (conditional).

Reconstruction (spec §2.3, Scrivens arXiv 2604.00072; no code is public): small MLPs get the
product of their layers' spectral norms, the canary-logit safety function of a linear
unembedding gets max‖h(x)‖, and everything else (LoRA on a transformer) gets κ · the largest
gradient norm found at sampled points — a bound only if the sampling found the worst case,
hence labelled `kind="estimated"`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int, check_int_array, check_real

Array = jax.Array
KINDS = ("analytic", "estimated")


@struct.dataclass
class LipschitzBound:
    """|s(θ) − s(θ')| ≤ value · ‖θ − θ'‖₂ (or Σ_g value_g ‖Δ_g‖₂ for a per-group bound).

    Attributes:
      value: `[]` (one bound) or `[G]` (one per parameter group), non-negative float32.
      kind: `"analytic"` (holds unconditionally) or `"estimated"` (holds only if the sampled
        gradient norms, times the safety factor κ, reach the true supremum: conditional).
    """

    value: Array
    kind: str = struct.field(pytree_node=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ArgumentError(f"kind must be one of {KINDS}, got {self.kind!r}")
        # A negative bound would let the ball gate accept any candidate. JAX also rebuilds this
        # class with placeholder leaves (None, sentinels, abstract values), which are skipped.
        if isinstance(self.value, (jax.Array, np.ndarray, np.number, int, float)):
            check_real("value", self.value, "[0, inf]")


def check_group_ids(group_ids, size: int) -> np.ndarray:
    ids = np.asarray(group_ids)
    if ids.shape != (size,):
        raise ArgumentError(f"group_ids must have shape [{size}], one per flattened parameter, got {ids.shape}")
    return check_int_array("group_ids", ids, 0)


def mlp_lipschitz_bound(
    weights: Sequence[Array], activation_lipschitz: float = 1.0, group_ids=None
) -> LipschitzBound:
    """Bound of an MLP `x ↦ W_K σ(… σ(W_1 x + b_1) …) + b_K` in its input x (= θ).

    L = a^{K−1} ∏_k ‖W_k‖₂ with a the activation's Lipschitz constant (1 for tanh, ReLU):
    exact spectral norms (SVD), so the bound is unconditional. With `group_ids`, the first
    layer is split by input columns: L_g = a^{K−1} ‖W_1[:, g]‖₂ ∏_{k≥2} ‖W_k‖₂, valid because
    ‖W_1 Δ‖ ≤ Σ_g ‖W_1[:, g] Δ_g‖.

    Args:
      weights: `[W_1 [h_1, d], …, W_K [out, h_{K−1}]]` in application order.
      activation_lipschitz: a ≥ 0.
      group_ids: optional int `[d]` (concrete), the group of every input coordinate.

    Returns:
      `LipschitzBound(value [] or [G], "analytic")`.
    """
    if not weights:
        raise ArgumentError("weights must hold at least one matrix, got none")
    check_real("activation_lipschitz", activation_lipschitz, "[0, inf)")
    for k, w in enumerate(weights):
        if jnp.ndim(w) != 2 or (k and w.shape[1] != weights[k - 1].shape[0]):
            raise ArgumentError(f"weights[{k}] has shape {jnp.shape(w)}; consecutive layers must chain as [out, in]")
    spectral = [jnp.linalg.norm(jnp.asarray(w, jnp.float32), ord=2) for w in weights]
    rest = activation_lipschitz ** (len(weights) - 1) * jnp.prod(jnp.stack(spectral[1:])) if len(weights) > 1 else 1.0
    if group_ids is None:
        return LipschitzBound(jnp.float32(spectral[0] * rest), "analytic")
    first = jnp.asarray(weights[0], jnp.float32)
    ids = check_group_ids(group_ids, first.shape[1])
    per_group = jnp.stack([jnp.linalg.norm(first[:, ids == g], ord=2) if (ids == g).any() else jnp.float32(0)
                           for g in range(ids.max() + 1)])
    return LipschitzBound((per_group * rest).astype(jnp.float32), "analytic")


def unembedding_lipschitz_bound(features: Array) -> LipschitzBound:
    """Bound of the canary-logit safety function s(W) = τ − max_x W_j · h(x) in the unembedding.

    s is a maximum of linear functions of W's column j, so |s(W) − s(W')| ≤ max_x ‖h(x)‖ ·
    ‖W_j − W'_j‖ ≤ max_x ‖h(x)‖ · ‖W − W'‖: exact and unconditional (spec §2.5).

    Args:
      features: `[N, D]` hidden states h(x) of the canary inputs (fixed: only W adapts).
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2 or not features.shape[0]:
        raise ArgumentError(f"features must be a non-empty [N, D] array, got shape {features.shape}")
    return LipschitzBound(jnp.max(jnp.linalg.norm(features, axis=-1)), "analytic")


def sampled_lipschitz_bound(
    safety_fn: Callable, key: Array, params, radius: float, num_samples: int = 16, kappa: float = 2.0, group_ids=None
) -> Callable:
    """A conditional bound at any centre: κ · max ‖∇s‖ over the centre and sampled points.

    The probe offsets (uniform in the ball of `radius`) are drawn once from `key` and reused at
    every centre, so the bound is a deterministic function of the centre (chaining re-bounds
    at each new centre with the same probes). It is a Lipschitz bound on that ball only if the
    sampled maximum times κ reaches the true supremum of ‖∇s‖ there: `kind="estimated"`.
    The gate certifies up to m / (κ L̂) from the centre, whatever `radius` was probed: pick
    `radius` at least that large, or the certificate extrapolates past the probes.

    Args:
      safety_fn: params pytree → scalar s.
      key: PRNG key for the probe offsets.
      params: a params pytree of the right structure (its values are not used).
      radius: probe radius > 0, in parameter units.
      num_samples: probes besides the centre.
      kappa: safety factor κ ≥ 1.
      group_ids: optional int `[d]`: per-group bounds κ · max ‖∇_g s‖ instead.

    Returns:
      `bound_fn(centre_params) -> LipschitzBound(value, "estimated")`.
    """
    check_real("radius", radius, "(0, inf)")
    check_real("kappa", kappa, "[1, inf)")
    num_samples = check_int("num_samples", num_samples, 0)
    flat, unravel = ravel_pytree(params)
    size = flat.shape[0]
    direction_key, length_key = jax.random.split(key)
    directions = jax.random.normal(direction_key, (num_samples, size), jnp.float32)
    directions /= jnp.linalg.norm(directions, axis=-1, keepdims=True)
    lengths = radius * jax.random.uniform(length_key, (num_samples, 1), jnp.float32) ** (1.0 / size)
    offsets = jnp.concatenate([jnp.zeros((1, size), jnp.float32), directions * lengths])
    ids = None if group_ids is None else jnp.asarray(check_group_ids(group_ids, size))
    num_groups = None if ids is None else int(ids.max()) + 1
    gradient = jax.grad(lambda x: safety_fn(unravel(x)))

    def bound_fn(centre) -> LipschitzBound:
        centre_flat, _ = ravel_pytree(centre)
        grads = jax.lax.map(gradient, centre_flat[None] + offsets)
        if ids is None:
            norms = jnp.linalg.norm(grads, axis=-1)
        else:
            norms = jnp.sqrt(jax.vmap(lambda g: jax.ops.segment_sum(g**2, ids, num_groups))(grads))
        return LipschitzBound(kappa * jnp.max(norms, axis=0), "estimated")

    return bound_fn
