"""The TRI-TSMC trust-region step: KL(β) = log N − H(softmax(β lw)) and its bisection."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax

from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.smc import solve_trust_region_beta, trust_region_kl


def _kl64(lw, beta):
    w = softmax(beta * np.asarray(lw, np.float64))
    w = w[w > 0]
    return np.log(len(lw)) + np.sum(w * np.log(w))


@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
@pytest.mark.parametrize("budget", [0.05, 0.5, 1.5])
def test_bisection_hits_the_budget(scale, budget):
    lw = jnp.asarray(np.random.default_rng(int(scale * 10)).normal(size=256) * scale, jnp.float32)
    beta = float(solve_trust_region_beta(lw, budget))
    if _kl64(lw, 1.0) <= budget:
        assert beta == 1.0
    else:
        assert 0.0 < beta < 1.0
        assert abs(_kl64(lw, beta) - budget) < 1e-4
        assert abs(float(trust_region_kl(lw, beta)) - budget) < 1e-4


def test_kl_is_zero_at_zero_and_monotone_in_beta():
    lw = jnp.asarray(np.random.default_rng(0).standard_cauchy(size=128), jnp.float32)
    betas = np.linspace(0.0, 1.0, 201)
    kls = np.array([float(trust_region_kl(lw, b)) for b in betas])
    assert abs(kls[0]) < 1e-6
    assert np.all(np.diff(kls) >= -1e-6)
    np.testing.assert_allclose(kls, [_kl64(lw, b) for b in betas], atol=1e-4)


def test_beta_is_one_when_the_budget_does_not_bind():
    lw = jnp.asarray(np.random.default_rng(1).normal(size=64) * 0.1, jnp.float32)
    assert _kl64(lw, 1.0) < 0.01
    assert float(solve_trust_region_beta(lw, 0.01)) == 1.0
    assert float(solve_trust_region_beta(jnp.zeros(8), 1e-3)) == 1.0  # equal weights: KL = 0


def test_minus_inf_weights_and_no_recompilation():
    lw = jnp.array([0.0, 1.0, -jnp.inf, 3.0, -2.0])
    beta = solve_trust_region_beta(lw, 0.5)
    assert abs(_kl64(np.where(np.isinf(lw), -1e30, lw), float(beta)) - 0.5) < 1e-4
    from jaxsample.smc.trust_region import bisect_beta

    counted = chex.assert_max_traces(bisect_beta.__wrapped__, n=1)
    jitted = jax.jit(counted)
    for budget in (0.1, 0.2, 0.3):
        jitted(lw, jnp.float32(budget))


def test_bad_arguments():
    with pytest.raises(ArgumentError, match="kl_budget"):
        solve_trust_region_beta(jnp.zeros(4), 0.0)
    with pytest.raises(ArgumentError, match="shape"):
        solve_trust_region_beta(jnp.zeros((2, 2)), 0.1)
    with pytest.raises(NumericalError, match="NaN"):
        solve_trust_region_beta(jnp.array([0.0, jnp.nan]), 0.1)
    with pytest.raises(NumericalError, match="-inf"):
        solve_trust_region_beta(jnp.full(3, -jnp.inf), 0.1)


# 32 path log-weights of a twist-learning SIS pass (the tabular toy of test_twist_learning,
# key 2) on which a vmapped while-loop bisection at ε = 0.1 never ended: its exit test and
# its per-row select disagreed at the tolerance.
HUNG_LOG_WEIGHTS = [float(np.float32(x)) for x in (
    "0.47721693 0.61482483 0.61482483 0.47721693 0.61482483 0.61482483 0.61482483 0.61482483 "
    "-3.833888 0.30965596 0.61482483 0.61482483 0.61482483 0.47721693 -0.38179168 0.74340487 "
    "0.61482483 0.61482483 -1.4318535 2.0282128 0.61482483 0.47721693 2.7211173 0.61482483 "
    "0.61482483 0.61482483 2.1356833 -1.1926028 0.47721693 0.61482483 0.61482483 0.47721693").split()]


def test_vmapped_bisection_ends_and_agrees_with_the_unbatched_one():
    # In a subprocess with a time limit, so that a bisection that never ends fails the test
    # instead of hanging the suite.
    script = (
        "import jax, jax.numpy as jnp\n"
        "from jaxsample.smc.trust_region import bisect_beta\n"
        f"lw = jnp.asarray({HUNG_LOG_WEIGHTS}, jnp.float32)\n"
        "batched = jax.jit(jax.vmap(bisect_beta, in_axes=(0, None)))(lw[None], jnp.float32(0.1))\n"
        "print(float(batched[0]), float(bisect_beta(lw, jnp.float32(0.1))))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the vmapped bisection did not end within 120 s (it takes about a second)")
    assert done.returncode == 0, done.stderr
    batched, alone = map(float, done.stdout.split())
    # The two programs round KL differently (hence the hang), so the roots agree to float32
    # KL resolution, not bit for bit.
    assert abs(batched - alone) < 1e-5
    for beta in (batched, alone):
        assert abs(_kl64(HUNG_LOG_WEIGHTS, beta) - 0.1) < 1e-4
