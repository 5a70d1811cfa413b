"""Conformal Selective Acting: wealth arithmetic, predictability, validity under the null, release."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample.calibration import baselines, csa
from jaxsample.errors import ArgumentError

GRID = np.linspace(0.02, 0.5, 25)


def scan_kernel(step, state, risks, losses):
    return jax.lax.scan(lambda s, x: step(s, *x), state, (jnp.asarray(risks, jnp.float32), jnp.asarray(losses, jnp.float32)))


def reference_log_wealth(grid, alpha, c, risks, losses, selective):
    """Float64 direct product Π(1 + λ a z) with λ recomputed from the raw past z's each round."""
    out = np.zeros(len(grid))
    for k, tau in enumerate(grid):
        past, wealth = [], 1.0
        for r, loss in zip(risks, losses):
            a = float(r <= tau)
            if not selective or a:
                z = alpha - (a * loss if not selective else loss)
                if past:
                    m, v = np.mean(past), np.var(past)
                    bet = np.clip(m / (v + m * m), 0.0, c / (1 - alpha)) if v + m * m > 0 else 0.0
                else:
                    bet = 0.0
                wealth *= 1.0 + bet * z
                past.append(z)
        out[k] = np.log(wealth)
    return out


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_log_wealth_matches_float64_direct_product(selective, binary):
    rng = np.random.default_rng(1)
    grid, alpha, c = np.linspace(0.1, 0.9, 5), 0.3, 0.5
    risks = rng.random(300)
    losses = (rng.random(300) < 0.6 * risks) * 1.0 if binary else rng.random(300) * risks
    state, _ = scan_kernel(csa.build_kernel(selective=selective), csa.init(grid, alpha, 0.1, c), risks, losses)
    expected = reference_log_wealth(grid, alpha, c, risks, losses, selective)
    assert np.abs(expected).max() > 1.0  # the wealth really moved
    np.testing.assert_allclose(np.asarray(state.log_wealth), expected, rtol=1e-4, atol=1e-4)


def stationary_stream(rng, num_rounds, batch=()):
    scores = rng.random((*batch, num_rounds))
    losses = (rng.random(scores.shape) < 0.02 + 0.6 * scores**2).astype(float)
    return scores, losses


def test_future_losses_never_change_past_decisions():
    rng = np.random.default_rng(2)
    scores, losses = stationary_stream(rng, 3000)
    step, state = csa.build_kernel(), csa.init(GRID, 0.1, 0.1)
    _, info, risks = csa.run_stream(step, state, scores, losses, refit_every=100)
    for t in (1234, 2200):  # mid-block and early-block rounds, after certification began
        changed = losses.copy()
        changed[t:] = 1.0 - changed[t:]
        _, info2, risks2 = csa.run_stream(step, state, scores, changed, refit_every=100)
        upto = slice(0, t + 1)  # round t's own decision is made before its loss is seen
        np.testing.assert_array_equal(np.asarray(info.deployed)[upto], np.asarray(info2.deployed)[upto])
        np.testing.assert_array_equal(np.asarray(info.action)[upto], np.asarray(info2.action)[upto])
        np.testing.assert_array_equal(risks[upto], risks2[upto])
        assert not np.array_equal(np.asarray(info.deployed), np.asarray(info2.deployed))  # the change mattered later
    assert (np.asarray(info.deployed) >= 0).any()


def test_deployed_index_is_from_before_the_update():
    grid = np.array([0.5])
    state = csa.init(grid, 0.5, 0.5, c=0.9)  # certify at log 2: a few loss-free acting rounds
    step = jax.jit(csa.build_kernel())
    deployed, certified = [], []
    for _ in range(6):
        state, info = step(state, 0.1, 0.0)
        deployed.append(int(info.deployed))
        certified.append(bool(info.certified[0]))
    first = certified.index(True)
    assert deployed[first] == -1 and deployed[first + 1] == 0
    assert int(csa.deploy(state)) == 0


def test_null_streams_rarely_certify():
    """Selective risk α + 0.05 at every threshold: P(ever certify) ≤ δ (Ville + Bonferroni)."""
    alpha, delta, seeds, rounds = 0.1, 0.1, 400, 2000
    key_risk, key_loss = jax.random.split(jax.random.key(3))
    risks = jax.random.uniform(key_risk, (seeds, rounds), maxval=0.5)
    losses = jax.random.bernoulli(key_loss, alpha + 0.05, (seeds, rounds)).astype(jnp.float32)
    step = csa.build_kernel()

    def ever_certified(risk, loss):
        _, info = scan_kernel(step, csa.init(GRID, alpha, delta), risk, loss)
        return info.certified.any()

    rate = float(jax.jit(jax.vmap(ever_certified))(risks, losses).mean())
    tolerance = 3.0 * np.sqrt(delta * (1 - delta) / seeds)  # 3 binomial standard errors at rate δ
    assert rate <= delta + tolerance


def test_tight_null_over_four_thresholds_needs_the_bonferroni_level():
    """K = 4 thresholds, each acting mostly on rounds of its own risk bin (masses 1:2:4:8), with
    selective risk exactly α at every one. At init's level log(K/δ) the family-wise rate of
    ever certifying stays ≤ δ; at log(1/δ) (no Bonferroni) the same streams exceed δ (0.72
    measured against δ = 0.5), so this null is tight enough to catch a missing correction."""
    alpha, delta, seeds, rounds, k = 0.2, 0.5, 1000, 1000, 4
    grid = np.arange(1, k + 1) / k
    mass = 2.0 ** np.arange(k) / (2.0**k - 1)
    key_bin, key_loss = jax.random.split(jax.random.key(7))
    risks = (jax.random.choice(key_bin, k, (seeds, rounds), p=jnp.asarray(mass)) + 0.5) / k
    losses = jax.random.bernoulli(key_loss, alpha, (seeds, rounds)).astype(jnp.float32)
    state = csa.init(grid, alpha, delta)
    np.testing.assert_allclose(state.log_threshold, np.log(k / delta), rtol=1e-6)
    step = csa.build_kernel()

    @jax.jit
    def rate(level):
        def ever_certified(risk, loss):
            _, info = scan_kernel(step, state._replace(log_threshold=level), risk, loss)
            return info.certified.any()
        return jax.vmap(ever_certified)(risks, losses).mean()

    tolerance = 3.0 * np.sqrt(delta * (1 - delta) / seeds)
    assert float(rate(state.log_threshold)) <= delta + tolerance
    assert float(rate(jnp.float32(np.log(1 / delta)))) > delta + tolerance


def test_boundary_null_single_threshold_within_ville_bound():
    """K = 1, risk exactly α: the crossing probability of log(1/δ) is at most δ; the test has teeth
    because this null is tight enough that the rate is far from 0."""
    alpha, delta, seeds, rounds = 0.2, 0.5, 400, 1000
    key_loss = jax.random.key(4)
    losses = jax.random.bernoulli(key_loss, alpha, (seeds, rounds)).astype(jnp.float32)
    step = csa.build_kernel()

    def ever_certified(loss):
        _, info = scan_kernel(step, csa.init(np.array([1.0]), alpha, delta), jnp.zeros(rounds), loss)
        return info.certified.any()

    rate = float(jax.jit(jax.vmap(ever_certified))(losses).mean())
    tolerance = 3.0 * np.sqrt(delta * (1 - delta) / seeds)
    assert 0.02 < rate <= delta + tolerance


def test_stationary_stream_releases_and_stays_below_alpha():
    rng = np.random.default_rng(5)
    scores, losses = stationary_stream(rng, 5000, batch=(4,))
    state = jax.vmap(lambda _: csa.init(GRID, 0.1, 0.1))(jnp.arange(4))
    final, info, _ = csa.run_stream(csa.build_kernel(), state, scores, losses)
    action = np.asarray(info.action)
    assert (np.asarray(csa.deploy(final)) >= 0).all()
    assert (action.mean(axis=1) > 0.15).all()  # the prototype releases ≈ 0.34 at T = 5000
    selective_risk = (action * losses).sum(axis=1) / action.sum(axis=1)
    assert (selective_risk < 0.1).all()


def test_batched_stream_equals_single_streams():
    rng = np.random.default_rng(6)
    scores, losses = stationary_stream(rng, 1000, batch=(2,))
    step = csa.build_kernel(sticky=True)
    batched = jax.vmap(lambda _: csa.init(GRID, 0.1, 0.2))(jnp.arange(2))
    _, info, _ = csa.run_stream(step, batched, scores, losses)
    for b in range(2):
        _, single, _ = csa.run_stream(step, csa.init(GRID, 0.1, 0.2), scores[b], losses[b])
        np.testing.assert_array_equal(np.asarray(info.deployed)[b], np.asarray(single.deployed))


def test_sticky_certificates_survive_wealth_loss():
    state = csa.init(np.array([0.5]), 0.5, 0.5, c=0.9)
    for sticky in (False, True):
        step, s = jax.jit(csa.build_kernel(sticky=sticky)), state
        for _ in range(5):
            s, _ = step(s, 0.1, 0.0)
        for _ in range(5):
            s, _ = step(s, 0.1, 1.0)
        assert float(s.log_wealth[0]) < float(s.log_threshold)
        assert int(csa.deploy(s)) == (0 if sticky else -1)


def test_changing_alpha_does_not_recompile():
    rng = np.random.default_rng(7)
    scores, losses = stationary_stream(rng, 200)
    step = csa.build_kernel()
    csa.run_stream(step, csa.init(GRID, 0.1, 0.1), scores, losses)
    before = csa._scan_block._cache_size()
    csa.run_stream(step, csa.init(GRID, 0.2, 0.05, c=0.3), scores, losses)
    assert csa._scan_block._cache_size() == before


def test_delta_can_be_traced():
    # np.log(k / δ) made a δ per stream (vmap) a TracerArrayConversionError.
    batched = jax.vmap(lambda delta: csa.init(GRID, 0.2, delta))(jnp.array([0.05, 0.1]))
    for i, delta in enumerate([0.05, 0.1]):
        for got, want in zip(batched, csa.init(GRID, 0.2, delta)):
            np.testing.assert_array_equal(got[i], want)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: csa.init(GRID, 0.0, 0.1), "alpha must be a number in (0, 1), got 0.0"),
        (lambda: csa.init(GRID, 1.0, 0.1), "alpha must be a number in (0, 1), got 1.0"),
        (lambda: csa.init(GRID, 0.1, 1.5), "delta must be a number in (0, 1), got 1.5"),
        (lambda: csa.init(GRID, 0.1, float("nan")), "delta must be a number in (0, 1), got nan"),
        (lambda: csa.init(GRID, 0.1, 0.1, c=1.0), "c must be a number in (0, 1), got 1.0"),
        (lambda: csa.init([0.1, 0.3, 0.3], 0.1, 0.1), "grid must be strictly increasing, but grid[1]=0.3 ≥ grid[2]=0.3"),
        (lambda: csa.init([0.5, 0.2], 0.1, 0.1), "grid must be strictly increasing"),
        (lambda: csa.init([], 0.1, 0.1), "grid must be a non-empty 1-D array"),
        (lambda: csa.run_stream(csa.build_kernel(), csa.init(GRID, 0.1, 0.1), [0.1, 0.2], [0.0, 1.5]),
         "losses must lie in [0, 1], got 1.5 at index [1]"),
        (lambda: csa.run_stream(csa.build_kernel(), csa.init(GRID, 0.1, 0.1), [0.1, 0.2], [0.0, -0.1]),
         "losses must lie in [0, 1], got -0.1"),
        (lambda: csa.run_stream(csa.build_kernel(), csa.init(GRID, 0.1, 0.1), [0.1, 0.2], [0.0, float("nan")]),
         "losses must lie in [0, 1], got nan"),
        (lambda: csa.run_stream(csa.build_kernel(), csa.init(GRID, 0.1, 0.1), [0.1, float("nan")], [0.0, 0.0]),
         "scores hold NaN"),
        (lambda: csa.run_stream(csa.build_kernel(), csa.init(GRID, 0.1, 0.1), [0.1], [0.0], refit_every=0),
         "refit_every must be an integer in [1, inf], got 0"),
        (lambda: csa.run_stream(csa.build_kernel(), csa.init(GRID, 0.1, 0.1), np.zeros((2, 4)), np.zeros((2, 4))),
         "scores are a batch [B=2, T=4], so state must carry a leading axis of B=2, but state.grid has shape (25,)"),
        (lambda: csa.run_stream(csa.build_kernel(), jax.vmap(lambda _: csa.init(GRID, 0.1, 0.1))(jnp.arange(3)),
                                np.zeros((2, 4)), np.zeros((2, 4))),
         "but state.grid has shape (3, 25)"),
        (lambda: csa.run_stream(csa.build_kernel(), jax.vmap(lambda _: csa.init(GRID, 0.1, 0.1))(jnp.arange(2)),
                                np.zeros(4), np.zeros(4)),
         "scores are one stream [T=4], but state is batched (state.alpha has shape (2,))"),
        (lambda: csa.run_stream(baselines.build_aci_kernel(), jax.vmap(lambda _: baselines.aci_init(GRID, 0.1))(jnp.arange(2)),
                                np.zeros(4), np.zeros(4)),
         "but state is batched (state.alpha has shape (2,))"),
        (lambda: baselines.ltt_fit([0.1, 0.2], [0.0, 0.5], GRID, 0.1, 0.1), "ltt_fit needs binary losses"),
        (lambda: baselines.crc_fit([0.1, 0.2], [0.0, 2.0], GRID, 0.1), "losses must lie in [0, 1]"),
        (lambda: baselines.crc_fit([0.1, 0.2], [0.0], GRID, 0.1), "risks and losses must have the same shape"),
        (lambda: baselines.ltt_fit([0.1, float("nan")], [0.0, 1.0], GRID, 0.1, 0.1), "risks hold NaN"),
        (lambda: baselines.aci_init(GRID, 0.1, gamma=0.0), "gamma must be a number in (0, inf), got 0.0"),
        (lambda: baselines.aci_init(GRID, 0.1, gamma=float("inf")), "gamma must be a number in (0, inf), got inf"),
        (lambda: baselines.aci_init(GRID, 0.1, gamma=True), "gamma must be a number in (0, inf), got True"),
        (lambda: baselines.aci_init(GRID, 0.1, threshold=0.9), "threshold must be a number in [0.02, 0.5], got 0.9"),
        (lambda: csa.init(GRID, None, 0.1), "alpha must be a number in (0, 1), got None"),
        (lambda: csa.init(GRID, jnp.array([0.1, 0.2]), 0.1), "alpha must be a number in (0, 1), got an array of shape (2,)"),
    ],
)
def test_argument_errors_are_clear(call, message):
    with pytest.raises(ArgumentError) as error:
        call()
    assert message in str(error.value)


@pytest.mark.parametrize("scalar", [jnp.float32, np.float32, np.array])
def test_scalar_arrays_are_accepted(scalar):
    state = csa.init(GRID, scalar(0.1), scalar(0.1), c=scalar(0.5))
    assert float(state.alpha) == pytest.approx(0.1)
    aci = baselines.aci_init(GRID, scalar(0.1), scalar(0.01), threshold=scalar(0.2))
    assert float(aci.gamma) == pytest.approx(0.01) and float(aci.threshold) == pytest.approx(0.2)
    assert baselines.ltt_fit([0.1, 0.2], [0.0, 1.0], GRID, scalar(0.5), scalar(0.5)) >= -1
    _, infos, _ = csa.run_stream(csa.build_kernel(), state, [0.1, 0.2], [0.0, 1.0], refit_every=jnp.int32(1))
    assert infos.action.shape == (2,)
