"""Baselines for CSA on the same calibrated-risk scale and grid [standard].

- A-RCPS (Xu, Karampatziakis, Mineiro, arXiv 2406.10490): CSA's betting construction with
  the marginal factor 1 + λ(α − a ℓ) on every round (`arcps_init`, `build_arcps_kernel`).
  Active labelling is not implemented (every loss is observed).
- ACI (Gibbs & Candès 2021): τ ← clip(τ + γ A (α − ℓ), τ_1, τ_K) (selective) or
  τ + γ(α − A ℓ) (marginal); no high-probability guarantee.
- CRC (Angelopoulos et al., conformal risk control): offline, marginal, in expectation.
- LTT (Angelopoulos et al., learn then test): offline, binomial p-values of the selective
  risk per threshold, fixed-sequence testing from the smallest threshold upwards.

Online baselines follow CSA's `step(state, risk, loss) -> (state, info)` interface (so
`csa.run_stream` runs them); offline ones return a grid index (−1: refuse).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.calibration import csa
from jaxsample.calibration.ltt import binomial_p_value, fixed_sequence
from jaxsample.errors import ArgumentError
from jaxsample.validation import check_scalar

Array = jax.Array

arcps_init = csa.init


def build_arcps_kernel(sticky: bool = False):
    """The A-RCPS round: CSA's betting e-process made marginal (vmap it over streams).

    Every threshold k bets on every round with the factor 1 + λ_k (α − a_k ℓ), a_k = 1 when
    it would act (r_t ≤ τ_k); certification and deployment as in CSA (`csa.build_kernel`
    with `selective=False`). Start from `arcps_init` (= `csa.init`).

    Args:
      sticky: keep a certificate once wealth crossed log(K/δ); default live certificates.

    Returns:
      `step(state, risk, loss) -> (state, CSAInfo)` on a `CSAState`, with `risk` the
      calibrated risk r_t (float `[]`) and `loss` ℓ_t ∈ [0, 1] (float `[]`).
    """
    return csa.build_kernel(sticky=sticky, selective=False)


class ACIState(NamedTuple):
    """Attributes: threshold `[]` current τ_t; low, high `[]` the grid's ends τ_1, τ_K;
    alpha `[]`; gamma `[]` step size γ."""

    threshold: Array
    low: Array
    high: Array
    alpha: Array
    gamma: Array


class ACIInfo(NamedTuple):
    """Attributes: threshold `[]` τ_t used this round (before the update); action bool `[]`."""

    threshold: Array
    action: Array


def aci_init(grid, alpha: float, gamma: float = 0.01, threshold: float | None = None) -> ACIState:
    """ACI starting at `threshold` (default the grid's middle element).

    Args:
      grid: `[K]` strictly increasing thresholds; τ stays within [grid[0], grid[-1]].
      alpha: target risk in (0, 1).
      gamma: step size γ > 0.
      threshold: starting τ inside the grid's range.
    """
    grid = csa.check_grid(grid)
    check_scalar("alpha", alpha, "(0, 1)")
    check_scalar("gamma", gamma, "(0, inf)")
    start = grid[len(grid) // 2] if threshold is None else threshold
    check_scalar("threshold", start, f"[{grid[0]}, {grid[-1]}]")
    return ACIState(*(jnp.float32(x) for x in (start, grid[0], grid[-1], alpha, gamma)))


def build_aci_kernel(selective: bool = True):
    """ACI round `step(state, risk, loss) -> (state, ACIInfo)`; selective or marginal update."""

    def step(state: ACIState, risk, loss):
        action = jnp.asarray(risk, jnp.float32) <= state.threshold
        loss = jnp.asarray(loss, jnp.float32)
        error = action * (state.alpha - loss) if selective else state.alpha - action * loss
        threshold = jnp.clip(state.threshold + state.gamma * error, state.low, state.high)
        return state._replace(threshold=threshold), ACIInfo(threshold=state.threshold, action=action)

    return step


def _check_offline(risks, losses, grid, alpha):
    risks, losses = csa.check_stream(risks, losses, "risks")
    if risks.ndim != 1:
        raise ArgumentError(f"risks and losses must be 1-D calibration arrays, got shape {risks.shape}")
    check_scalar("alpha", alpha, "(0, 1)")
    grid = csa.check_grid(grid)
    return risks, losses, grid, risks[:, None] <= grid[None, :]


def crc_fit(risks, losses, grid, alpha: float) -> int:
    """Conformal risk control: max{k : (n R̂(τ_k) + 1)/(n + 1) ≤ α}, R̂(τ) = mean a(τ) ℓ; −1 if none.

    Args:
      risks: `[n]` calibrated risks of exchangeable calibration rounds.
      losses: `[n]` their losses in [0, 1] (bound B = 1).
      grid: `[K]` thresholds.
      alpha: risk level in (0, 1).
    """
    risks, losses, grid, acts = _check_offline(risks, losses, grid, alpha)
    n = len(losses)
    empirical = (acts * losses[:, None]).mean(axis=0)
    ok = np.flatnonzero((n * empirical + 1.0) / (n + 1.0) <= alpha)
    return int(ok.max()) if ok.size else -1


def ltt_fit(risks, losses, grid, alpha: float, delta: float) -> int:
    """Learn then Test on the selective risk; the last threshold rejected in fixed sequence, or −1.

    H_k: selective risk of τ_k > α, p_k = BinomCDF(s_k; n_k, α) with n_k acting calibration
    rounds and s_k their losses; tested from the smallest τ upwards at level δ.

    Args:
      risks: `[n]` calibrated risks of exchangeable calibration rounds.
      losses: `[n]` binary losses (0 or 1; the binomial p-value needs them binary).
      grid: `[K]` thresholds.
      alpha: risk level in (0, 1).
      delta: error probability in (0, 1).
    """
    risks, losses, grid, acts = _check_offline(risks, losses, grid, alpha)
    check_scalar("delta", delta, "(0, 1)")
    if not np.all((losses == 0) | (losses == 1)):
        raise ArgumentError("ltt_fit needs binary losses (0 or 1) for its binomial p-values")
    p_values = binomial_p_value((acts * losses[:, None]).sum(axis=0), acts.sum(axis=0), alpha)
    return int(fixed_sequence(p_values, delta))
