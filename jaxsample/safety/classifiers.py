"""Classifier gates, the baselines the verifier is compared against (spec §2.2, §2.4).

Reconstruction: a classifier trained on labelled safe/unsafe proposals scores P(safe | θ');
the gate accepts iff the score reaches the threshold of the current step. A fixed threshold
gives a constant false-accept rate; an annealed one is calibrated on held-out unsafe
proposals so that their accept rate is ≈ c · n^(−p) at step n (spec: δ_n ≈ c n^−1.5). Whether
either meets the dual conditions is measured in the `gate` experiment, not assumed.

Logistic regression, k-NN and random forests come from scikit-learn (called from inside the
jitted loop through `jax.pure_callback`); the MLP is JAX/optax.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxsample.errors import ArgumentError
from jaxsample.safety.gate import Gate, GateState, initial_state, record_decision
from jaxsample.validation import check_int, check_real

Array = jax.Array
CLASSIFIERS = ("logistic", "knn", "random_forest", "mlp")


def _sklearn_model(kind: str, seed: int):
    try:
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError(
            f"the {kind!r} classifier gate needs scikit-learn: pip install 'jaxsample[baselines]' "
            "(the 'mlp' classifier does not)") from e

    model = {
        "logistic": lambda: LogisticRegression(C=1.0, max_iter=2000),
        "knn": lambda: KNeighborsClassifier(n_neighbors=15),
        "random_forest": lambda: RandomForestClassifier(n_estimators=50, min_samples_leaf=2, random_state=seed, n_jobs=1),
    }[kind]()
    return make_pipeline(StandardScaler(), model)


def _fit_mlp(key: Array, features: np.ndarray, labels: np.ndarray, hidden: int = 64, steps: int = 400) -> Callable:
    mean, scale = features.mean(0), features.std(0) + 1e-6
    x = jnp.asarray((features - mean) / scale, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (x.shape[1], hidden), jnp.float32) / jnp.sqrt(x.shape[1]),
        "b1": jnp.zeros(hidden, jnp.float32),
        "w2": jax.random.normal(k2, (hidden,), jnp.float32) / jnp.sqrt(hidden),
        "b2": jnp.zeros((), jnp.float32),
    }

    def logit(params, x):
        return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

    def loss(params):
        return optax.sigmoid_binary_cross_entropy(logit(params, x), y).mean()

    optimizer = optax.adam(1e-2)

    def step(carry, _):
        params, opt_state = carry
        updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    mean, scale = jnp.asarray(mean, jnp.float32), jnp.asarray(scale, jnp.float32)
    return lambda flat: jax.nn.sigmoid(logit(params, (flat - mean) / scale))


def fit_classifier(kind: str, key: Array, candidates: Array, safe: Array) -> Callable:
    """Trains a P(safe | θ') scorer on labelled proposals.

    Args:
      kind: one of `CLASSIFIERS`.
      key: PRNG key (MLP init; forest seed).
      candidates: `[N, d]` flattened proposals.
      safe: bool `[N]` labels (both classes must occur).

    Returns:
      `score_fn(flat [d]) -> P(safe)` float32 `[]`, jit-able (scikit-learn models run through
      `jax.pure_callback`).
    """
    if kind not in CLASSIFIERS:
        raise ArgumentError(f"kind must be one of {CLASSIFIERS}, got {kind!r}")
    features = np.asarray(candidates, np.float32)
    labels = np.asarray(safe, bool)
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ArgumentError(f"candidates [N, d] and safe [N] disagree: {features.shape} vs {labels.shape}")
    if labels.all() or not labels.any():
        raise ArgumentError(f"safe must hold both classes, got {int(labels.sum())} safe of {labels.size}")
    if kind == "mlp":
        return _fit_mlp(key, features, labels)
    model = _sklearn_model(kind, int(jax.random.randint(key, (), 0, 2**31 - 1)))
    model.fit(features, labels)
    safe_column = list(model.classes_).index(True)

    def host_score(flat):
        flat = np.asarray(flat, np.float32)
        rows = flat.reshape(-1, features.shape[1])
        return model.predict_proba(rows)[:, safe_column].astype(np.float32).reshape(flat.shape[:-1])

    def score_fn(flat):
        shape = jax.ShapeDtypeStruct(flat.shape[:-1], jnp.float32)
        return jax.pure_callback(host_score, shape, flat, vmap_method="expand_dims")

    return score_fn


def annealed_thresholds(unsafe_scores: Array, num_steps: int, scale: float = 0.5, power: float = 1.5) -> Array:
    """Thresholds t_n with held-out unsafe accept rate P(score ≥ t_n | unsafe) ≈ c · n^(−p).

    Once c n^(−p) falls below 1 / (number of held-out unsafe proposals), t_n sits just above the
    highest unsafe score: the calibration set can certify nothing smaller.

    Args:
      unsafe_scores: `[M]` classifier scores of held-out unsafe proposals.
      num_steps: N, thresholds for steps 1..N.
      scale: c > 0.  power: p > 0.

    Returns:
      float32 `[N]`.
    """
    num_steps = check_int("num_steps", num_steps, 1)
    check_real("scale", scale, "(0, inf)")
    check_real("power", power, "(0, inf)")
    scores = np.asarray(unsafe_scores, np.float64)
    if scores.ndim != 1 or not scores.size:
        raise ArgumentError(f"unsafe_scores must be a non-empty [M] array, got shape {np.shape(unsafe_scores)}")
    # A NaN would sort last and turn every threshold into NaN: a gate that rejects everything.
    check_real("unsafe_scores", scores, "(-inf, inf)")
    scores = np.sort(scores)[::-1]
    rate = scale * np.arange(1, num_steps + 1, dtype=np.float64) ** -power
    admitted = np.floor(rate * scores.size).astype(int)  # unsafe held-out proposals allowed through
    above_all = np.nextafter(np.float32(scores[0]), np.float32(np.inf))
    padded = np.concatenate([[above_all], scores.astype(np.float32)])
    return jnp.asarray(padded[np.minimum(admitted, scores.size)], jnp.float32)


def classifier_gate(
    score_fn: Callable, thresholds: Array, safety_fn: Callable, *, threshold: float = 0.0, unit_radius: float = 1.0
) -> Gate:
    """Accept iff score_fn(θ') ≥ thresholds[n] (the last threshold after the schedule ends).

    Args:
      score_fn: `flat [d] -> P(safe)` (from `fit_classifier`).
      thresholds: `[N]` per-step thresholds (a constant array for a fixed threshold).
      safety_fn: the oracle, used only to count true and false accepts.
      threshold: τ of the oracle.
      unit_radius: the unit of `GateState.distance` (e.g. a verifier's r_0, to compare).
    """
    thresholds = jnp.atleast_1d(jnp.asarray(thresholds, jnp.float32))
    check_real("unit_radius", unit_radius, "(0, inf)")

    def init(params) -> GateState:
        flat, _ = ravel_pytree(params)
        nan = jnp.float32(jnp.nan)
        return initial_state(flat.astype(jnp.float32), nan, nan, jnp.float32(unit_radius))

    def accept(state: GateState, candidate) -> tuple[Array, GateState]:
        flat, _ = ravel_pytree(candidate)
        flat = flat.astype(jnp.float32)
        cut = thresholds[jnp.minimum(state.step, thresholds.shape[0] - 1)]
        accepted = score_fn(flat) >= cut
        candidate_margin = jnp.asarray(safety_fn(candidate), jnp.float32) - threshold
        state = record_decision(state, flat, accepted, candidate_margin)
        return accepted, state._replace(centre=jnp.where(accepted, flat, state.centre))

    return Gate(init, accept)
