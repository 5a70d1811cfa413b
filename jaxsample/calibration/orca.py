"""ORCA: a test-time-trained probe that stops a reasoning chain early, calibrated by LTT.

Zhou et al., "Online Reasoning Calibration: Test-Time Training Enables Generalizable
Conformal LLM Reasoning" (arXiv 2604.01170); public code wzekai99/ORCA @2b8160f. The probe,
its label-free inner update, the meta-training and the LTT rule follow that code (spec
calibration.md §2.2-2.5, anchors-2026-12.md); two parts are **reconstructions**: the static
baseline here fits its logistic regression on every step embedding (the code uses one
embedding per 10-step block) with an optax loop instead of scikit-learn, and the label
expansion (one label per step) is left to the caller.

Per problem the fast weights (W, b) restart from the meta-learned (W_0, b_0); at step t the
probe scores first, s_t = σ(⟨W, θ_Q φ_t⟩ + b), then takes one SGD step on the label-free
loss (σ(⟨W, θ_K φ_t⟩ + b) − 0)² with step size η = exp(log η). The pseudo-target 0 pushes the
score of what this problem has looked like so far down, so a change of direction (the
problem getting solved) stands out against the problem's own offset. Meta-training
backpropagates the outer loss mean_t (s_t − C_t)² through every inner step into θ_K, θ_Q,
W_0, b_0 and log η. Generation stops at the first step whose trailing mean score (window
w) reaches λ; LTT picks λ so that P(the answer at the stop is wrong) ≤ δ with probability
≥ 1 − ε over exchangeable calibration and test problems (strict rule: the last λ rejected in
fixed sequence, not the first non-rejected one as the released code does).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsample.calibration.ltt import binomial_p_value, fixed_sequence
from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int, check_scalar

__all__ = [
    "Evaluation",
    "ProbeParams",
    "StaticProbe",
    "evaluate",
    "init_probe",
    "lambda_grid",
    "ltt_calibrate",
    "meta_loss",
    "meta_train",
    "probe_scan",
    "smooth",
    "static_probe_fit",
    "static_probe_scores",
    "stop_indices",
    "stop_losses",
    "ttt_scores",
]

Array = jax.Array


class ProbeParams(NamedTuple):
    """Slow weights of the TTT probe.

    Attributes:
      theta_k: float32 `[d_h, d]` key projection, or None (`no_kq`: u = φ, d_h = d).
      theta_q: float32 `[d_h, d]` query projection, or None: tied to θ_K (the code's tied
        variant; with θ_K None too, the queries are φ).
      w0: float32 `[d_h]` initial fast weight.
      b0: float32 `[]` initial fast bias.
      log_eta: float32 `[]` log of the inner step size.
    """

    theta_k: Array | None
    theta_q: Array | None
    w0: Array
    b0: Array
    log_eta: Array


def init_probe(
    key, feature_size: int, hidden_size: int | None = None, eta: float = 0.01, tied: bool = False
) -> ProbeParams:
    """Probe as the code initialises it: W_0 ~ N(0, 0.02²), b_0 = 0, η = `eta`.

    Args:
      key: PRNG key.
      feature_size: d, the width of a step embedding.
      hidden_size: d_h of the K/Q projections (θ ~ N(0, 1/d)); None for `no_kq`.
      eta: initial inner step size η ≥ 0 (0 makes a static linear probe); may be traced.
      tied: one projection θ_Q = θ_K (needs `hidden_size`).
    """
    feature_size = check_int("feature_size", feature_size, 1)
    if hidden_size is not None:
        hidden_size = check_int("hidden_size", hidden_size, 1)
    check_scalar("eta", eta, "[0, inf)")
    if tied and hidden_size is None:
        raise ArgumentError("tied=True ties the K and Q projections: it needs a hidden_size")
    key_w, key_k, key_q = jax.random.split(key, 3)
    width = feature_size if hidden_size is None else hidden_size
    # Draws in float32 whatever jax_enable_x64 says (the default dtype would follow it).
    scale = jnp.float32(np.sqrt(feature_size))
    theta = None if hidden_size is None else (
        jax.random.normal(key_k, (hidden_size, feature_size), jnp.float32) / scale,
        jax.random.normal(key_q, (hidden_size, feature_size), jnp.float32) / scale)
    return ProbeParams(
        theta_k=None if theta is None else theta[0],
        theta_q=None if theta is None or tied else theta[1],
        w0=0.02 * jax.random.normal(key_w, (width,), jnp.float32),
        b0=jnp.float32(0.0),
        log_eta=jnp.log(jnp.asarray(eta, jnp.float32)),  # log 0 = −inf: the static probe
    )


@jax.jit
def probe_scan(params: ProbeParams, phi, mask) -> Array:
    """Scores of one problem's steps, each taken before that step's label-free update.

    Args:
      params: slow weights.
      phi: float32 `[n, d]` step embeddings (padded).
      mask: bool `[n]` real steps; padded steps leave the fast weights unchanged.

    Returns:
      float32 `[n]` scores s_t ∈ (0, 1) (padded steps score too, from the carried weights).
    """
    keys = phi if params.theta_k is None else phi @ params.theta_k.T
    queries = keys if params.theta_q is None else phi @ params.theta_q.T
    eta = jnp.exp(params.log_eta)

    def body(carry, x):
        w, b = carry
        key, query, real = x
        score = jax.nn.sigmoid(query @ w + b)
        p = jax.nn.sigmoid(key @ w + b)
        grad = 2.0 * p * p * (1.0 - p)  # d/dz (σ(z) − 0)², the pseudo-target is always 0
        w = jnp.where(real, w - eta * grad * key, w)
        b = jnp.where(real, b - eta * grad, b)
        return (w, b), score

    _, scores = jax.lax.scan(body, (params.w0, params.b0), (keys, queries, mask))
    return scores


def meta_loss(params: ProbeParams, phi, labels, mask) -> Array:
    """Masked mean of (s_t − C_t)² over a batch of problems (mean over problems).

    Args:
      params: slow weights.
      phi: float32 `[P, n, d]` step embeddings.
      labels: `[P, n]` step labels C_t ∈ {0, 1} (1: the answer at this step is correct).
      mask: bool `[P, n]`; labels at padded steps are ignored (NaN included).
    """
    scores = jax.vmap(probe_scan, in_axes=(None, 0, 0))(params, phi, mask)
    # Zero the padded labels before squaring: masking only the product would keep the loss
    # finite but send 0 · NaN = NaN gradients back from NaN padding.
    labels = jnp.where(mask, jnp.asarray(labels, jnp.float32), 0.0)
    squared = jnp.where(mask, (scores - labels) ** 2, 0.0)
    per_problem = jnp.sum(squared, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)
    return jnp.mean(per_problem)


def meta_train(key, params: ProbeParams, phi, labels, mask, epochs: int = 20, batch_size: int = 1,
               learning_rate: float = 1e-3, learn_eta: bool = True):
    """Meta-trains the slow weights through the unrolled inner updates (Adam, clip 1.0).

    Args:
      key: PRNG key for the problem order.
      params: initial slow weights (`init_probe`).
      phi: float32 `[P, n, d]` training problems' step embeddings.
      labels: `[P, n]` step labels.
      mask: bool `[P, n]`.
      epochs: passes over the problems.
      batch_size: problems per Adam step (1 as in the released code).
      learning_rate: Adam learning rate (traced: a new rate reuses the compiled epoch).
      learn_eta: False freezes log η (e.g. η = 0 for the static ablation).

    Returns:
      `(params, losses)` with `losses` float32 `[epochs]` the mean batch loss of each epoch.
    """
    phi, labels, mask = _check_problems(phi, labels, mask)
    batch_size = check_int("batch_size", batch_size, 1, phi.shape[0])
    epochs = check_int("epochs", epochs, 1)
    learning_rate = jnp.asarray(learning_rate, jnp.float32)
    learn_eta = jnp.asarray(learn_eta, bool)
    opt_state = _optimizer(learning_rate).init(params)
    losses = []
    for epoch_key in jax.random.split(key, epochs):
        params, opt_state, loss = _train_epoch(params, opt_state, epoch_key, phi, labels, mask, learning_rate,
                                               learn_eta, batch_size)
        losses.append(loss)
    return params, jnp.stack(losses)


def _optimizer(learning_rate) -> optax.GradientTransformation:
    """Adam clipped at global norm 1.0. Built inside the jitted epoch from a traced rate: an
    optimizer passed as a static argument hashes by identity, so every call recompiled."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


@partial(jax.jit, static_argnames="batch_size")
def _train_epoch(params, opt_state, key, phi, labels, mask, learning_rate, learn_eta, batch_size):
    order = jax.random.permutation(key, phi.shape[0])
    batches = order[: phi.shape[0] // batch_size * batch_size].reshape(-1, batch_size)
    optimizer = _optimizer(learning_rate)

    def body(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(meta_loss)(params, phi[batch], labels[batch], mask[batch])
        # A zero gradient leaves log η where it is (Adam's step is 0/(0 + ε)) and adds nothing
        # to the clipped norm, as masking it out of the optimizer did.
        grads = grads._replace(log_eta=jnp.where(learn_eta, grads.log_eta, 0.0))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), batches)
    return params, opt_state, losses.mean()


def smooth(scores, mask, window: int = 10) -> Array:
    """Trailing mean of the last `window` ≥ 1 real scores (fewer at the start), `[..., n]`."""
    return _smooth(scores, mask, check_int("window", window, 1))


@partial(jax.jit, static_argnames="window")
def _smooth(scores, mask, window: int) -> Array:
    scores = jnp.where(mask, scores, 0.0)
    total = jnp.cumsum(scores, axis=-1)
    shifted = jnp.pad(total, [(0, 0)] * (total.ndim - 1) + [(window, 0)])[..., : total.shape[-1]]
    steps = jnp.minimum(jnp.arange(total.shape[-1]) + 1, window)
    return (total - shifted) / steps


def stop_indices(smoothed, mask, lambdas) -> Array:
    """First step whose smoothed score is ≥ λ, else the last real step: int32 `[..., J]`.

    Monotone in λ: a searchsorted on the running maximum, not a rescan per λ.

    Args:
      smoothed: `[..., n]` smoothed scores.
      mask: bool `[..., n]` real steps: a prefix of each row, at least one (checked unless
        traced).
      lambdas: `[J]` thresholds.
    """
    _check_prefix_mask(mask)
    return _stop_indices(smoothed, mask, lambdas)


@jax.jit
def _stop_indices(smoothed, mask, lambdas) -> Array:
    running = jax.lax.cummax(jnp.where(mask, smoothed, -jnp.inf), axis=smoothed.ndim - 1)
    last = jnp.sum(mask, axis=-1) - 1
    flat_running = running.reshape(-1, running.shape[-1])
    first = jax.vmap(lambda r: jnp.searchsorted(r, lambdas, side="left"))(flat_running)
    first = first.reshape(*running.shape[:-1], -1)
    return jnp.minimum(first, last[..., None]).astype(jnp.int32)


def lambda_grid(size: int = 10000) -> Array:
    """λ_j = 1 − j/size, j = 0..size−1: from conservative (stop late) to aggressive."""
    return 1.0 - jnp.arange(size, dtype=jnp.float32) / size


def ltt_calibrate(smoothed, labels, mask, delta: float, epsilon: float = 0.05, lambdas=None):
    """Strict LTT over λ: P(error at the stop ≤ δ) ≥ 1 − ε for exchangeable problems.

    H_j: risk of λ_j > δ with p_j = BinomCDF(Σ_i L_i(λ_j); n, δ), L_i = 1 − C_{i, T_i(λ_j)};
    fixed-sequence testing at level ε from the conservative end.

    Args:
      smoothed: `[P, n]` calibration problems' smoothed scores.
      labels: `[P, n]` step labels C ∈ {0, 1}.
      mask: bool `[P, n]`: a non-empty prefix of real steps in each row.
      delta: target risk δ ∈ (0, 1).
      epsilon: error probability ε ∈ (0, 1).
      lambdas: `[J]` decreasing grid (default `lambda_grid()`).

    Returns:
      λ̂ (float32 `[]`), +inf when even the first λ is not certified (never stop early).
    """
    check_scalar("delta", delta, "(0, 1)")
    check_scalar("epsilon", epsilon, "(0, 1)")
    smoothed, labels, mask = _check_shapes("smoothed", smoothed, labels, mask, ndim=2)
    not_binary = mask & (labels != 0) & (labels != 1)  # padding is never a stop: its labels are free
    if not isinstance(not_binary, jax.core.Tracer) and bool(jnp.any(not_binary)):
        where = tuple(int(i) for i in jnp.argwhere(not_binary)[0])
        raise ArgumentError(
            f"labels must be 0 or 1 at real steps (the binomial p-values count wrong stops), got {labels[where].item():g} at {where}")
    lambdas = lambda_grid() if lambdas is None else jnp.asarray(lambdas, jnp.float32)
    if lambdas.ndim != 1 or lambdas.size == 0:
        raise ArgumentError(f"lambdas must be a non-empty 1-D grid [J], got shape {lambdas.shape}")
    losses = stop_losses(smoothed, labels, mask, lambdas)
    p_values = binomial_p_value(losses.sum(axis=0), losses.shape[0], delta)
    index = fixed_sequence(p_values, epsilon)
    return jnp.where(index >= 0, lambdas[jnp.maximum(index, 0)], jnp.inf)


def stop_losses(smoothed, labels, mask, lambdas) -> Array:
    """L_i(λ_j) = 1 − C_{i, T_i(λ_j)}, float32 `[P, J]` (mask as in `stop_indices`)."""
    _check_prefix_mask(mask)
    return _stop_losses(smoothed, labels, mask, lambdas)


@jax.jit
def _stop_losses(smoothed, labels, mask, lambdas) -> Array:
    stops = _stop_indices(smoothed, mask, lambdas)
    return 1.0 - jnp.take_along_axis(jnp.asarray(labels, jnp.float32), stops, axis=-1)


class Evaluation(NamedTuple):
    """Stopping at λ on P problems (`evaluate`).

    Attributes:
      error_rate: float32 `[]` fraction of problems whose answer at the stop is wrong.
      num_wrong: int32 `[]` their count: compare it, not the rounded rate, with δ·P.
      savings: float32 `[]` mean fraction of steps saved, 1 − (T + 1) / n, with T the stop
        index and n the problem's real steps.
      stops: int32 `[P]` stop index T of each problem (its last real step when λ is never reached).
    """

    error_rate: Array
    num_wrong: Array
    savings: Array
    stops: Array


def evaluate(smoothed, labels, mask, lam) -> Evaluation:
    """Error rate and step savings of stopping at λ on problems `[P, n]` (mask as in `stop_indices`)."""
    _check_prefix_mask(mask)
    return _evaluate(smoothed, labels, mask, lam)


@jax.jit
def _evaluate(smoothed, labels, mask, lam) -> Evaluation:
    stops = _stop_indices(smoothed, mask, jnp.reshape(jnp.asarray(lam, jnp.float32), (1,)))[..., 0]
    correct = jnp.take_along_axis(jnp.asarray(labels, jnp.float32), stops[:, None], axis=-1)[:, 0]
    lengths = jnp.sum(mask, axis=-1)
    wrong = jnp.sum(correct == 0).astype(jnp.int32)
    return Evaluation(error_rate=jnp.mean(1.0 - correct), num_wrong=wrong,
                      savings=jnp.mean(1.0 - (stops + 1) / lengths), stops=stops)


@jax.jit
def ttt_scores(params: ProbeParams, phi, mask) -> Array:
    """`probe_scan` over a batch `[P, n, d]` → `[P, n]`; reads no label."""
    return jax.vmap(probe_scan, in_axes=(None, 0, 0))(params, phi, mask)


class StaticProbe(NamedTuple):
    """Standardise → PCA → logistic regression (the non-TTT baseline; a reconstruction,
    see the module docstring). float32 throughout.

    Attributes:
      mean: `[d]` feature means over the training step embeddings.
      scale: `[d]` feature standard deviations (+ 1e-6).
      components: `[d, r]` the top r principal directions of the standardised features.
      weights: `[r]` logistic-regression weights on the projected features.
      bias: `[]` its intercept.
    """

    mean: Array
    scale: Array
    components: Array
    weights: Array
    bias: Array


def static_probe_fit(phi, labels, mask, components: int = 256, steps: int = 500, learning_rate: float = 0.05,
                     l2: float = 1e-4) -> StaticProbe:
    """Fits the static baseline on every real step embedding (full-batch Adam on the
    L2-regularised logistic loss).

    Args:
      phi: `[P, n, d]`; labels: `[P, n]`; mask: bool `[P, n]`.
      components: PCA dimension r (capped at d).
      steps: optimisation steps.
      learning_rate: Adam learning rate (traced: a new rate reuses the compiled epoch).
      l2: weight penalty.
    """
    phi, labels, mask = _check_problems(phi, labels, mask)
    x, y = phi[mask], labels[mask].astype(jnp.float32)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    _, _, vt = jnp.linalg.svd(z, full_matrices=False)
    basis = vt[: min(components, vt.shape[0])].T
    weights, bias = _fit_logistic(z @ basis, y, jnp.asarray(learning_rate, jnp.float32),
                                  jnp.asarray(l2, jnp.float32), steps)
    return StaticProbe(mean, scale, basis, weights, bias)


@partial(jax.jit, static_argnames="steps")
def _fit_logistic(features, y, learning_rate, l2, steps):
    """Full-batch Adam on the L2-regularised logistic loss, jitted so that its scan (a new
    closure per call when it was built inline) compiles once per shape."""

    def loss(theta):
        logits = features @ theta[0] + theta[1]
        return optax.sigmoid_binary_cross_entropy(logits, y).mean() + l2 * jnp.sum(theta[0] ** 2)

    optimizer = optax.adam(learning_rate)

    def body(carry, _):
        theta, state = carry
        grads = jax.grad(loss)(theta)
        updates, state = optimizer.update(grads, state)
        return (optax.apply_updates(theta, updates), state), None

    theta = (jnp.zeros(features.shape[1], jnp.float32), jnp.float32(0.0))
    (theta, _), _ = jax.lax.scan(body, (theta, optimizer.init(theta)), None, length=steps)
    return theta


@jax.jit
def static_probe_scores(probe: StaticProbe, phi) -> Array:
    """σ(logistic regression) of every step embedding, `[..., n]`."""
    return jax.nn.sigmoid(((phi - probe.mean) / probe.scale) @ probe.components @ probe.weights + probe.bias)


def _check_shapes(name: str, values, labels, mask, ndim: int):
    """`values` (`[P, n, d]` for ndim 3, `[P, n]` for 2) and its labels and mask `[P, n]` as arrays."""
    values = jnp.asarray(values, jnp.float32)
    labels = jnp.asarray(labels)
    mask = jnp.asarray(mask, bool)
    layout = "[P, n, d]" if ndim == 3 else "[P, n]"
    if values.ndim != ndim or labels.shape != values.shape[:2] or mask.shape != values.shape[:2]:
        raise ArgumentError(f"{name} must be {layout} with labels and mask [P, n]; got {values.shape}, {labels.shape}, {mask.shape}")
    return values, labels, mask


def _check_prefix_mask(mask) -> None:
    """Raises unless every row of a concrete mask `[..., n]` is 1s then 0s with at least one 1.

    A row without a real step would stop at index −1, which wraps to its last padded label.
    """
    if isinstance(mask, jax.core.Tracer):
        return
    mask = np.asarray(mask).astype(bool)
    empty = ~mask[..., :1].any(axis=-1)
    gap = (mask[..., 1:] & ~mask[..., :-1]).any(axis=-1)
    if empty.any() or gap.any():
        row = tuple(int(i) for i in np.argwhere(empty | gap)[0])
        problem = "has no real step" if empty[row] else "has a real step after padding"
        where = f"row {row[0]}" if len(row) == 1 else f"row {row}" if row else "the row"
        raise ArgumentError(f"mask must mark a non-empty prefix of real steps (1s then 0s) in every row; {where} {problem}")


def _check_problems(phi, labels, mask):
    phi, labels, mask = _check_shapes("phi", phi, labels, mask, ndim=3)
    if not bool(jnp.all(jnp.isfinite(phi))):
        raise ArgumentError("phi holds NaN or inf")
    return phi, labels, mask
