"""CausalRM: reward models from observational feedback (selection bias + label noise).

Wang et al., "CausalRM: Causal-Theoretic Reward Modeling for RLHF from Observational User
Feedbacks" (arXiv 2603.18736). The paper's code was not located; the estimators follow the
public yhc-666/Causal-RM repository (OME-IPS / OME-DR of Li et al., KDD 2024), which is not
confirmed as the paper's release, and ../shared/specs/training.md §3. What is
**reconstructed** is marked where it appears (the DR imputation default, the simulation's
selection law on continuous ratings).

Variables, per logged item i: features x_i (e.g. mean-pooled LM hidden states), the true
preference y_i ∈ {0, 1}, whether feedback was observed o_i ∈ {0, 1} with propensity
p(x) = P(o = 1 | x), and the observed label ỹ_i, flipped class-conditionally:

    a = P(ỹ = 1 | y = 0),   b = P(ỹ = 0 | y = 1),   D = 1 − a − b > 0.

Losses take per-item logits f(x) `[N]` of the reward head and return a scalar to minimise;
every sum runs over all N logged items, observed or not (unobserved items contribute 0
except through the DR imputation). `observed` and `noisy_labels` hold 0/1 (or bools) for every
item, unobserved ones included; anything else (e.g. ±1 labels) raises when the arrays are concrete.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy

from jaxsample.errors import ArgumentError
from jaxsample.training.grpo import as_float, check_shape_of
from jaxsample.validation import check_int, check_real

Array = jax.Array


def check_flip_rates(a, b) -> None:
    """Raises `ArgumentError` unless 0 ≤ a, b < 1 and a + b < 1 (the correction divides by 1 − a − b)."""
    for name, value in (("a (P(ỹ=1|y=0))", a), ("b (P(ỹ=0|y=1))", b)):
        if not isinstance(value, jax.core.Tracer) and not 0 <= float(value) < 1:
            raise ArgumentError(f"flip rate {name} must be in [0, 1), got {float(value)}")
    if not isinstance(a, jax.core.Tracer) and not isinstance(b, jax.core.Tracer) and float(a) + float(b) >= 1:
        raise ArgumentError(
            f"flip rates a={float(a)} and b={float(b)} sum to {float(a) + float(b)} ≥ 1: labels carry no "
            "information (the correction divides by 1 − a − b)"
        )


def check_propensities(propensity) -> None:
    """Raises `ArgumentError` unless every (concrete) propensity lies in (0, 1]."""
    if isinstance(propensity, jax.core.Tracer):
        return
    values = np.asarray(propensity)
    bad = ~((values > 0) & (values <= 1))
    if bad.any():
        raise ArgumentError(f"propensities must lie in (0, 1]; found {values[bad].ravel()[0]} at index {int(np.flatnonzero(bad.ravel())[0])}")


def check_binary(name: str, labels) -> None:
    """Raises `ArgumentError` unless every (concrete) label is 0 or 1 (±1 labels are a common slip)."""
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    if values.dtype == bool:
        return
    check_real(name, values, "[-inf, inf]")
    bad = (values != 0) & (values != 1)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ArgumentError(f"{name} must be labels in {{0, 1}}, got {values[bad].ravel()[0].item()!r} (element {index})")


def _per_item(logits, **arrays) -> list[Array]:
    """Each of `arrays` as a float array, checked to have the `[N]` shape of `logits`."""
    shape = jnp.shape(logits)
    return [check_shape_of(name, value, "logits", shape) for name, value in arrays.items()]


def _feedback(logits, observed, noisy_labels, **arrays) -> list[Array]:
    """`_per_item` of `observed`, `noisy_labels` and `arrays`; the first two must be 0/1 (when concrete).

    A label of −1 would pass the BCE silently as softplus(f) + f, which can be negative.
    """
    check_binary("observed", observed)
    check_binary("noisy_labels", noisy_labels)
    return _per_item(logits, observed=observed, noisy_labels=noisy_labels, **arrays)


def bce(logits: Array, labels: Array) -> Array:
    """Per-item binary cross-entropy of logits against labels in {0, 1} (or [0, 1]), stable."""
    return jax.nn.softplus(logits) - labels * logits


def corrected_bce(logits: Array, noisy_labels: Array, a, b) -> Array:
    """Backward-corrected BCE (Natarajan et al. 2013; Patrini et al. 2017), per item.

    ℓ̃(f, 1) = [(1 − a) ℓ(f, 1) − b ℓ(f, 0)] / D and ℓ̃(f, 0) = [(1 − b) ℓ(f, 0) − a ℓ(f, 1)] / D,
    so E_{ỹ|y} ℓ̃(f, ỹ) = ℓ(f, y) for each y. It can be negative.
    """
    check_flip_rates(a, b)
    positive, negative = bce(logits, 1.0), bce(logits, 0.0)
    denominator = 1.0 - a - b
    if_one = ((1.0 - a) * positive - b * negative) / denominator
    if_zero = ((1.0 - b) * negative - a * positive) / denominator
    return jnp.where(noisy_labels > 0.5, if_one, if_zero)


def naive_loss(logits: Array, observed: Array, noisy_labels: Array) -> Array:
    """Plain BCE on the observed items (ignores selection and noise); every argument is `[N]`."""
    logits = as_float(logits)
    observed, noisy_labels = _feedback(logits, observed, noisy_labels)
    return jnp.sum(observed * bce(logits, noisy_labels)) / jnp.maximum(observed.sum(), 1.0)


def noise_corrected_loss(logits: Array, observed: Array, noisy_labels: Array, a, b) -> Array:
    """Corrected BCE on the observed items: fixes the flips, not the selection; arrays are `[N]`."""
    logits = as_float(logits)
    observed, noisy_labels = _feedback(logits, observed, noisy_labels)
    return jnp.sum(observed * corrected_bce(logits, noisy_labels, a, b)) / jnp.maximum(observed.sum(), 1.0)


def ips_loss(logits, observed, noisy_labels, propensity, a=0.0, b=0.0, clip: float = 0.1) -> Array:
    """(1/N) Σ_i o_i ℓ̃(f(x_i), ỹ_i) / max(p̂_i, clip); a = b = 0 gives IPS without noise correction.

    Unbiased for the clean full-data loss (1/N) Σ ℓ(f(x_i), y_i) when p̂ = p, the flip rates
    are right and the clip is inactive. `logits`, `observed`, `noisy_labels` and `propensity` are `[N]`.
    """
    check_propensities(propensity)
    logits = as_float(logits)
    observed, noisy_labels, propensity = _feedback(logits, observed, noisy_labels, propensity=propensity)
    weights = observed / jnp.maximum(propensity, clip)
    return jnp.mean(weights * corrected_bce(logits, noisy_labels, a, b))


def dr_loss(logits, observed, noisy_labels, propensity, imputed, a, b, clip: float = 0.1, imputation: str = "corrected") -> Array:
    """Doubly robust: (1/N) Σ_i [ê_i + o_i (ℓ̃_i − ê_i) / max(p̂_i, clip)].

    `imputed` q_i = P̂(ỹ = 1 | x_i) from a classifier of ỹ on observed items.
    imputation="corrected" (default, a **reconstruction**): ê_i = q_i ℓ̃(f, 1) + (1 − q_i) ℓ̃(f, 0),
    which equals E[ℓ̃ | x_i] when q is right, so the loss is unbiased when either p̂ or q is.
    imputation="plain" (the reference code): ê_i = BCE(f, q_i), unbiased only through p̂.
    Every array argument is `[N]`.
    """
    check_propensities(propensity)
    logits = as_float(logits)
    observed, noisy_labels, propensity, imputed = _feedback(logits, observed, noisy_labels, propensity=propensity, imputed=imputed)
    if imputation == "corrected":
        error = imputed * corrected_bce(logits, 1.0, a, b) + (1.0 - imputed) * corrected_bce(logits, 0.0, a, b)
    elif imputation == "plain":
        error = bce(logits, imputed)
    else:
        raise ArgumentError(f"imputation must be 'corrected' or 'plain', got {imputation!r}")
    weights = observed / jnp.maximum(propensity, clip)
    return jnp.mean(error + weights * (corrected_bce(logits, noisy_labels, a, b) - error))


# ---------------------------------------------------------------------------------------
# Simulation (spec §3.5)


class Simulation(NamedTuple):
    """One draw of the logging process over N items.

    Attributes:
      clean: int32 `[N]` true preference y.
      observed: bool `[N]` feedback observed o.
      noisy: int32 `[N]` observed label ỹ (flipped only where observed; y elsewhere, never read).
      propensity: float32 `[N]` true p(x).
    """

    clean: Array
    observed: Array
    noisy: Array
    propensity: Array


def selection_propensity(rating, selection_strength: float, observation_rate: float, rating_max: float = 5.0) -> np.ndarray:
    """p = k·s^(r_max − r), capped at 1, with k set so that mean p = `observation_rate`.

    The reference applies this to integer rating levels; on continuous ratings (a
    **reconstruction**) the same law is used as is. Smaller s = stronger bias toward
    high ratings.
    """
    if not 0 < selection_strength <= 1:
        raise ArgumentError(f"selection_strength s must be in (0, 1], got {selection_strength}")
    if not 0 < observation_rate <= 1:
        raise ArgumentError(f"observation_rate must be in (0, 1], got {observation_rate}")
    shape = np.power(selection_strength, rating_max - np.asarray(rating, np.float64))
    low, high = 0.0, 1.0 / shape.min()
    for _ in range(100):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if np.minimum(middle * shape, 1).mean() < observation_rate else (low, middle)
    return np.minimum(high * shape, 1.0).astype(np.float32)


def simulate(key: Array, clean, propensity, a: float, b: float) -> Simulation:
    """Draws o ~ Bernoulli(p) and flips observed labels with rates (a, b).

    `clean` holds the true preferences y ∈ {0, 1} (not ratings: those go to
    `selection_propensity`); `propensity` has its shape.
    """
    check_flip_rates(a, b)
    check_propensities(propensity)
    check_binary("clean", clean)
    clean = jnp.asarray(clean, jnp.int32)
    propensity = check_shape_of("propensity", propensity, "clean", clean.shape).astype(jnp.float32)
    # float32 draws and rates whatever jax_enable_x64 says: the default dtype follows it,
    # which drew other observations and flips for the same key.
    observe_key, flip_key = jax.random.split(key)
    observed = jax.random.uniform(observe_key, clean.shape, jnp.float32) < propensity
    rate = jnp.where(clean == 1, jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32))
    flip = jax.random.uniform(flip_key, clean.shape, jnp.float32) < rate
    noisy = jnp.where(observed & flip, 1 - clean, clean)
    return Simulation(clean, observed, noisy, propensity)


# ---------------------------------------------------------------------------------------
# Heads and nuisance estimators


class MLPHead(nn.Module):
    """A logit head on features: `[..., d] -> [...]`, linear when `hidden` is empty, else a
    LeakyReLU MLP.

    Attributes:
      hidden: widths of the hidden Dense layers, in order (default (256, 64)).
    """

    hidden: Sequence[int] = (256, 64)

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.leaky_relu(nn.Dense(width)(x))
        return nn.Dense(1)(x)[..., 0]


class FittedHead(NamedTuple):
    """A trained head (`fit_head`); `logits(features [..., d]) -> float32 [...]` applies it.

    Attributes:
      module: the `MLPHead` (its `hidden` widths).
      params: its flax params pytree (float32) at the best validation check (the initial
        params when no check ran).
      history: validation loss (float) at every check, in order, up to early stopping.
    """

    module: MLPHead
    params: dict
    history: list

    def logits(self, features) -> Array:
        """float32 logits `[...]` of features `[..., d]`."""
        return self.module.apply({"params": self.params}, jnp.asarray(features, jnp.float32))


def fit_head(
    key: Array,
    features,
    loss_fn: Callable[[Array, np.ndarray], Array],
    *,
    train_index,
    validation_index,
    hidden: Sequence[int] = (256, 64),
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-6,
    steps: int = 600,
    check_every: int = 25,
    patience: int = 6,
) -> FittedHead:
    """Full-batch Adam on `loss_fn(logits, index)` with early stopping on the validation split.

    `loss_fn(logits [len(index)], index)` scores the logits of the items `index` (the same
    function is the training and the validation criterion, so every arm validates with the
    loss it trains on — for IPS arms an IPS loss on observed items, never unobserved labels).
    """
    features = jnp.asarray(features, jnp.float32)
    module = MLPHead(tuple(hidden))
    params = module.init(key, features[:1])["params"]
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    train_index, validation_index = np.asarray(train_index), np.asarray(validation_index)
    train_x, validation_x = features[train_index], features[validation_index]

    @jax.jit
    def update(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(module.apply({"params": p}, train_x), train_index))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def validate(params):
        return loss_fn(module.apply({"params": params}, validation_x), validation_index)

    opt_state = optimizer.init(params)
    best, best_params, history, waited = np.inf, params, [], 0
    for step in range(1, steps + 1):
        params, opt_state, _ = update(params, opt_state)
        if step % check_every == 0:
            loss = float(validate(params))
            history.append(loss)
            if loss < best - 1e-6:
                best, best_params, waited = loss, params, 0
            else:
                waited += 1
                if waited >= patience:
                    break
    return FittedHead(module, best_params, history)


def estimate_flip_rates(noisy_logits, quantile: float = 0.97) -> tuple[float, float]:
    """Anchor-quantile flip rates from a classifier of ỹ on observed items.

    P(ỹ = 1 | x) = a + D η(x) equals a where η = 0 and 1 − b where η = 1, so
    â = σ(q_{1−quantile} of the logits) and b̂ = 1 − σ(q_quantile). Biased when no x has η
    near 0 or 1.
    """
    if not 0.5 < quantile < 1:
        raise ArgumentError(f"quantile must be in (0.5, 1), got {quantile}")
    logits = np.asarray(noisy_logits, np.float64)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return float(sigmoid(np.quantile(logits, 1 - quantile))), float(1 - sigmoid(np.quantile(logits, quantile)))


# ---------------------------------------------------------------------------------------
# Evaluation


class RewardEvaluation(NamedTuple):
    """Quality of predicted P(y = 1 | x) against clean labels.

    Attributes:
      accuracy: fraction with (prob > 0.5) == y.
      auroc: area under the ROC curve (ties count one half); NaN when `clean` holds one class only.
      bce: mean binary cross-entropy.
      ece: expected calibration error over `bins` equal-width bins.
      bias: mean prediction − base rate.
    """

    accuracy: float
    auroc: float
    bce: float
    ece: float
    bias: float


def evaluate_reward(probabilities, clean, bins: int = 10) -> RewardEvaluation:
    """Accuracy, AUROC, BCE, ECE and bias of predicted probabilities against clean labels.

    Every metric but the BCE uses the probabilities as given; the BCE clips them to
    [1e-7, 1 − 1e-7] so that its logs stay finite. AUROC is NaN (undefined) when `clean`
    holds only one class.

    Args:
      probabilities: `[N]` predicted P(y = 1 | x) in [0, 1] (apply a sigmoid to logits first).
      clean: `[N]` labels in {0, 1}.
      bins: number of ECE bins, ≥ 1.
    """
    check_int("bins", bins, 1)
    check_real("probabilities", probabilities, "[0, 1]")
    check_binary("clean", clean)
    p, y = np.asarray(probabilities, np.float64), np.asarray(clean, np.float64)
    if p.ndim != 1 or p.shape != y.shape or len(p) == 0:
        raise ArgumentError(f"probabilities and clean must both have the same shape [N], N >= 1, got {p.shape} and {y.shape}")
    ranks = scipy.stats.rankdata(p)
    positives = y.sum()
    negatives = len(y) - positives
    # No positive-negative pair to rank: AUROC is undefined, not 0.
    auroc = (ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives) if positives * negatives else np.nan
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = sum(abs(p[which == k].mean() - y[which == k].mean()) * (which == k).mean() for k in range(bins) if (which == k).any())
    # Clipped only inside the logs: clipping p for the ranks would tie distinct tiny probabilities.
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    return RewardEvaluation(
        accuracy=float(((p > 0.5) == (y == 1)).mean()),
        auroc=float(auroc),
        bce=float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()),
        ece=float(ece),
        bias=float(p.mean() - y.mean()),
    )

