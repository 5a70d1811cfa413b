"""Conformal Selective Acting (CSA): anytime-valid control of the selective risk of acting.

Khosravi & Huo, "Conformal Selective Acting: Anytime-Valid Risk Control for RLVR-Trained
LLMs" (arXiv 2605.20270). No public code exists and only the abstract is available: the
setting (per-round wrapper, Ville-type e-process per threshold on a Bonferroni grid,
selective risk, max-certified-threshold deployment, isotonic-calibrated monotone risk) is
from the abstract; the concrete construction below is a **reconstruction** (spec
calibration.md §1.2-1.5):

- each round a calibrated risk r_t = g_{t-1}(S_t) arrives; threshold k would act iff
  r_t ≤ τ_k; the loss ℓ_t ∈ [0, 1] is revealed on every round, abstentions included;
- threshold k bets against H_k: E[a_k (ℓ − α) | past] ≥ 0 with wealth
  E_k = Π (1 + λ_k a_k (α − ℓ)), kept as log-wealth; λ_k is the aGRAPA-style predictable
  bet clip(m / (v + m²), 0, c / (1 − α)) from the Welford mean m and variance v of
  z = α − ℓ over k's past acting rounds (0 before the first);
- k is certified while log E_k ≥ log(K/δ) (Ville + Bonferroni: P(any null threshold is
  ever certified) ≤ δ); certificates are live by default, sticky as an option;
- the deployed threshold is the largest certified one, from wealth before the current loss;
  with none certified the wrapper refuses (abstains).

The same kernel with `selective=False` is the marginal A-RCPS e-process (factor
1 + λ(α − a ℓ) on every round); `jaxsample.calibration.baselines` exposes it.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.calibration.isotonic import isotonic_fit, isotonic_predict
from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int, check_scalar

__all__ = [
    "CSAInfo",
    "CSAState",
    "build_kernel",
    "calibrated_risks",
    "check_grid",
    "check_stream",
    "deploy",
    "init",
    "isotonic_refits",
    "predictable_bet",
    "run_stream",
]

Array = jax.Array


class CSAState(NamedTuple):
    """Wealth and bet statistics of the K thresholds of one stream.

    Attributes:
      grid: float32 `[K]` strictly increasing thresholds τ_k on the calibrated-risk scale.
      alpha: float32 `[]` error budget α.
      log_threshold: float32 `[]` log(K/δ), the certification level.
      max_bet: float32 `[]` c / (1 − α), the largest bet (every factor stays ≥ 1 − c).
      log_wealth: float32 `[K]` log E_k.
      count: float32 `[K]` rounds that entered k's bet statistics.
      mean: float32 `[K]` Welford mean of z = α − ℓ over those rounds.
      m2: float32 `[K]` Welford sum of squared deviations of z.
      certified: bool `[K]` current certificates (live: log E_k ≥ log(K/δ); sticky: ever so).
    """

    grid: Array
    alpha: Array
    log_threshold: Array
    max_bet: Array
    log_wealth: Array
    count: Array
    mean: Array
    m2: Array
    certified: Array


class CSAInfo(NamedTuple):
    """What one round did.

    Attributes:
      deployed: int32 `[]` index of the threshold deployed this round (from wealth before
        the round's loss), −1 when refusing.
      action: bool `[]` whether the wrapper acted: r_t ≤ τ_deployed.
      certified: bool `[K]` certificates after the update.
      bet: float32 `[K]` the predictable bets λ_k used this round.
    """

    deployed: Array
    action: Array
    certified: Array
    bet: Array


def check_grid(grid) -> np.ndarray:
    """`grid` as a float array `[K]`, K ≥ 1, finite and strictly increasing; else ArgumentError."""
    array = np.asarray(grid, np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ArgumentError(f"grid must be a non-empty 1-D array of thresholds, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ArgumentError(f"grid must be finite, got {array.tolist()}")
    steps = np.diff(array)
    if np.any(steps <= 0):
        bad = int(np.argmax(steps <= 0))
        raise ArgumentError(
            f"grid must be strictly increasing, but grid[{bad}]={array[bad]} ≥ grid[{bad + 1}]={array[bad + 1]}")
    return array


def init(grid, alpha: float, delta: float, c: float = 0.5) -> CSAState:
    """Fresh state: unit wealth, no statistics, nothing certified.

    Args:
      grid: `[K]` strictly increasing thresholds on the calibrated-risk scale.
      alpha: error budget α ∈ (0, 1).
      delta: miscoverage δ ∈ (0, 1) of the anytime certificate (all K thresholds together).
      c: bet cap c ∈ (0, 1); bets lie in [0, c / (1 − α)].
    """
    grid = check_grid(grid)
    check_scalar("alpha", alpha, "(0, 1)")
    check_scalar("delta", delta, "(0, 1)")
    check_scalar("c", c, "(0, 1)")
    k = grid.size
    zeros = jnp.zeros(k, jnp.float32)
    return CSAState(
        grid=jnp.asarray(grid, jnp.float32),
        alpha=jnp.float32(alpha),
        log_threshold=jnp.log(k / jnp.asarray(delta, jnp.float32)),  # jnp: δ may be traced (one per stream)
        max_bet=jnp.float32(c / (1.0 - alpha)),
        log_wealth=zeros,
        count=zeros,
        mean=zeros,
        m2=zeros,
        certified=jnp.zeros(k, bool),
    )


def deploy(state: CSAState) -> Array:
    """Index of the largest certified threshold, int32 `[]`; −1 (refuse) when none is."""
    indices = jnp.arange(state.grid.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(state.certified, indices, -1), axis=-1)


def predictable_bet(state: CSAState) -> Array:
    """aGRAPA-style bet λ_k = clip(m / (v + m²), 0, c/(1−α)) from past rounds, `[K]`; 0 before any."""
    second_moment = state.m2 / jnp.maximum(state.count, 1.0) + state.mean**2
    ratio = jnp.where(second_moment > 0, state.mean / jnp.where(second_moment > 0, second_moment, 1.0), 0.0)
    return jnp.where(state.count > 0, jnp.clip(ratio, 0.0, state.max_bet), 0.0)


def build_kernel(sticky: bool = False, selective: bool = True):
    """The CSA round, vectorised over the K thresholds (vmap it over streams).

    Args:
      sticky: keep a certificate once wealth crossed log(K/δ) (valid by Ville, blind to
        later regressions); default live certificates.
      selective: True for CSA (threshold k bets only on rounds where it would act, with
        z = α − ℓ); False for the marginal A-RCPS e-process (every round, z = α − a_k ℓ).

    Returns:
      `step(state, risk, loss) -> (state, CSAInfo)` with `risk` the calibrated risk r_t
      (float `[]`) and `loss` ℓ_t ∈ [0, 1] (float `[]`). Losses are not range-checked inside
      the jitted step; `run_stream` checks them.
    """

    def step(state: CSAState, risk, loss) -> tuple[CSAState, CSAInfo]:
        risk = jnp.asarray(risk, jnp.float32)
        loss = jnp.asarray(loss, jnp.float32)
        deployed = deploy(state)
        threshold = jnp.where(deployed >= 0, state.grid[jnp.maximum(deployed, 0)], -jnp.inf)
        action = risk <= threshold
        acts = risk <= state.grid
        if selective:
            z = state.alpha - loss
            enters = acts
        else:
            z = state.alpha - acts * loss
            enters = jnp.ones_like(acts)
        bet = predictable_bet(state)
        log_wealth = state.log_wealth + jnp.where(enters, jnp.log1p(bet * z), 0.0)
        count = state.count + enters
        delta_mean = z - state.mean
        mean = jnp.where(enters, state.mean + delta_mean / jnp.maximum(count, 1.0), state.mean)
        m2 = jnp.where(enters, state.m2 + delta_mean * (z - mean), state.m2)
        crossed = log_wealth >= state.log_threshold
        certified = (state.certified | crossed) if sticky else crossed
        new_state = state._replace(log_wealth=log_wealth, count=count, mean=mean, m2=m2, certified=certified)
        return new_state, CSAInfo(deployed=deployed, action=action, certified=certified, bet=bet)

    return step


def check_stream(scores, losses, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """`scores`, `losses` as float arrays of equal shape `[T]` or `[B, T]`, losses in [0, 1], no NaN.

    `name` is what the caller calls `scores` (e.g. "risks"), for the messages.
    """
    scores = np.asarray(scores, np.float64)
    losses = np.asarray(losses, np.float64)
    if scores.shape != losses.shape or scores.ndim not in (1, 2) or scores.shape[-1] == 0:
        raise ArgumentError(f"{name} and losses must have the same shape [T] or [B, T] with T ≥ 1, got {scores.shape} and {losses.shape}")
    if np.isnan(scores).any():
        raise ArgumentError(f"{name} hold NaN at {np.argwhere(np.isnan(scores))[0].tolist()}")
    bad = ~((losses >= 0.0) & (losses <= 1.0))
    if bad.any():
        where = np.argwhere(bad)[0]
        raise ArgumentError(f"losses must lie in [0, 1], got {losses[tuple(where)]} at index {where.tolist()}")
    return scores, losses


def isotonic_refits(scores, losses, refit_every: int) -> list:
    """The calibration map of every block of `refit_every` rounds: block j (rounds
    [j m, (j+1) m)) uses the isotonic fit of losses on scores over rounds < j m; block 0 has
    none (None: g ≡ 1, nothing acts).

    Args:
      scores: `[T]` raw risk scores (higher = riskier).
      losses: `[T]` losses in [0, 1].
      refit_every: m ≥ 1.

    Returns:
      list of ⌈T/m⌉ `IsotonicFit` (None first).
    """
    starts = range(0, len(scores), refit_every)
    return [isotonic_fit(scores[:start], losses[:start]) if start else None for start in starts]


def calibrated_risks(scores, losses, refit_every: int) -> np.ndarray:
    """r_t = g_{t−1}(S_t), g from `isotonic_refits` (fitted on past rounds only), float64 `[T]`."""
    risks = np.ones(len(scores))
    for block, fit in enumerate(isotonic_refits(scores, losses, refit_every)):
        if fit is not None:
            rounds = slice(block * refit_every, (block + 1) * refit_every)
            risks[rounds] = isotonic_predict(fit, scores[rounds])
    return risks


def run_stream(step, state, scores, losses, refit_every: int = 100):
    """Runs a wrapper kernel over whole streams: isotonic refits on the host, `lax.scan` between.

    Works for every kernel of the `step(state, risk, loss) -> (state, info)` interface (CSA,
    A-RCPS, ACI). A batch of streams `[B, T]` takes a batched state (e.g. from
    `jax.vmap(lambda _: init(...))(jnp.arange(B))`) and runs them vmapped.

    Args:
      step: the kernel from `build_kernel` (or a baseline's).
      state: its initial state (leading axis B for a batch).
      scores: `[T]` or `[B, T]` raw risk scores; no NaN.
      losses: same shape, in [0, 1].
      refit_every: rounds between isotonic refits, ≥ 1.

    Returns:
      `(state, infos, risks)`: final state, infos stacked over rounds (`[T, ...]` or
      `[B, T, ...]`), and the calibrated risks `[T]` / `[B, T]` the kernel saw.
    """
    scores, losses = check_stream(scores, losses)
    refit_every = check_int("refit_every", refit_every, 1)
    _check_state_batch(state, scores.shape)
    batched = scores.ndim == 2
    if batched:
        risks = np.stack([calibrated_risks(s, l, refit_every) for s, l in zip(scores, losses)])
    else:
        risks = calibrated_risks(scores, losses, refit_every)
    infos = []
    for start in range(0, scores.shape[-1], refit_every):
        block = slice(start, start + refit_every)
        state, info = _scan_block(step, batched, state, jnp.asarray(risks[..., block], jnp.float32),
                                  jnp.asarray(losses[..., block], jnp.float32))
        infos.append(info)
    infos = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1 if batched else 0), *infos)
    return state, infos, risks


def _check_state_batch(state, shape) -> None:
    """Raises unless `state` is batched exactly when the streams are (`shape` [B, T] vs [T]);
    vmap and the kernels would otherwise fail with errors that name neither argument."""
    if len(shape) == 2:
        batch = shape[0]
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
                raise ArgumentError(
                    f"scores are a batch [B={batch}, T={shape[1]}], so state must carry a leading axis of "
                    f"B={batch}, but state{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; build it "
                    f"with jax.vmap(lambda _: init(...))(jnp.arange({batch}))")
    # Every state of this package (CSAState, ACIState) holds a scalar alpha per stream, so a
    # batched state shows as a batched alpha; other kernels' states are not checked here.
    elif jnp.ndim(getattr(state, "alpha", 0.0)) != 0:
        raise ArgumentError(
            f"scores are one stream [T={shape[0]}], but state is batched (state.alpha has shape "
            f"{jnp.shape(state.alpha)}); pass scores [B, T] or an unbatched state")


@partial(jax.jit, static_argnames=("step", "batched"))
def _scan_block(step, batched, state, risks, losses):
    """One jitted scan over a block of rounds (vmapped over streams when batched)."""

    def scan(state, risks, losses):
        return jax.lax.scan(lambda s, x: step(s, *x), state, (risks, losses))

    return (jax.vmap(scan) if batched else scan)(state, risks, losses)
