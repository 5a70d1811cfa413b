"""Cut laws and the log acceptance ratio on hand-checkable traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample.errors import ArgumentError
from jaxsample.mcmc import EntropyJump, Trace, entropy_jump, log_acceptance_ratio, resolve_cut_law, uniform

N = 5


def _trace(log_p=(), log_q=(), entropy=(), tokens=None):
    length = len(log_p)

    def padded(values):
        return jnp.asarray(np.pad(np.asarray(values, np.float32), (0, N - length)))

    tokens = np.arange(length) if tokens is None else tokens
    return Trace(
        tokens=jnp.asarray(np.pad(tokens, (0, N - length)), jnp.int32),
        log_p=padded(log_p),
        log_q=padded(log_q),
        entropy=padded(entropy if len(entropy) else np.zeros(length)),
        length=jnp.int32(length),
    )


def test_uniform_cut_law():
    log_c = _trace([-1.0] * 3, [-1.0] * 3).cut_log_probs(uniform)
    np.testing.assert_allclose(log_c, [-np.log(3)] * 3 + [-np.inf] * 2, rtol=1e-6)


def test_entropy_jump_law_by_hand():
    trace = _trace([-1.0] * 4, [-1.0] * 4, entropy=[0.5, 1.5, 1.0, 2.0])
    # Jumps from H_{-1} = 0: 0.5, 1.0, −0.5, 1.0 → w = 0.5⁴, 1, 0, 1.
    expected = np.log([0.0625 / 2.0625, 1 / 2.0625, 1e-300, 1 / 2.0625, 1e-300])
    expected[[2, 4]] = -np.inf
    np.testing.assert_allclose(trace.cut_log_probs(entropy_jump(4.0)), expected, rtol=1e-6)
    squared = np.array([0.25, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(np.exp(trace.cut_log_probs(entropy_jump(2.0)))[:4],
                               squared / squared.sum(), rtol=1e-6)
    # β is a traced leaf: a jitted (and vmapped) function of β gives the same laws.
    by_beta = jax.jit(jax.vmap(lambda beta: trace.cut_log_probs(entropy_jump(beta))))
    np.testing.assert_allclose(by_beta(jnp.array([4.0, 2.0])),
                               [trace.cut_log_probs(entropy_jump(beta)) for beta in (4.0, 2.0)])


def test_entropy_jump_falls_back_to_uniform_without_upward_jumps():
    trace = _trace([-1.0] * 3, [-1.0] * 3, entropy=[0.0, 0.0, 0.0])
    np.testing.assert_allclose(trace.cut_log_probs(entropy_jump()),
                               [-np.log(3)] * 3 + [-np.inf] * 2, rtol=1e-6)


def test_entropy_jump_ignores_positions_after_length():
    # A large entropy in the padding must not enter W.
    trace = _trace([-1.0] * 2, [-1.0] * 2, entropy=[1.0, 2.0])
    padded = trace._replace(entropy=trace.entropy.at[3].set(50.0))
    law = entropy_jump()
    np.testing.assert_allclose(padded.cut_log_probs(law), trace.cut_log_probs(law))


def test_uniform_ratio_by_hand():
    alpha = 4.0
    current = _trace([-0.5, -1.0, -2.0], [-0.3, -0.7, -1.1])
    proposed = _trace([-0.5, -0.2], [-0.3, -0.4])
    ratio = log_acceptance_ratio(jnp.int32(1), alpha, current, proposed, uniform)
    np.testing.assert_allclose(ratio.log_power, alpha * (-0.2 - (-1.0 - 2.0)), rtol=1e-6)
    np.testing.assert_allclose(ratio.log_proposal, (-0.7 - 1.1) - (-0.4), rtol=1e-6)
    np.testing.assert_allclose(ratio.log_cut, np.log(3) - np.log(2), rtol=1e-6)
    np.testing.assert_allclose(
        ratio.log_ratio, ratio.log_power + ratio.log_proposal + ratio.log_cut, rtol=1e-6)


def test_reverse_cut_impossible_under_proposed_law_rejects():
    # x uses the uniform fallback (no upward jump); x' has a jump elsewhere, so c(1 | x') = 0:
    # the reverse move cannot happen and the move must be rejected.
    current = _trace([-1.0] * 3, [-1.0] * 3, entropy=[0.0, 0.0, 0.0])
    proposed = _trace([-1.0] * 3, [-1.0] * 3, entropy=[0.0, 0.0, 1.0])
    ratio = log_acceptance_ratio(jnp.int32(1), 2.0, current, proposed, entropy_jump())
    assert ratio.log_cut == -np.inf and ratio.log_ratio == -np.inf


def test_nan_ratio_rejects():
    current = _trace([-1.0, np.nan], [-1.0, -1.0])
    proposed = _trace([-1.0, -2.0], [-1.0, -1.0])
    ratio = log_acceptance_ratio(jnp.int32(1), 2.0, current, proposed, uniform)
    assert np.isnan(ratio.log_power) and ratio.log_ratio == -np.inf


@pytest.mark.parametrize("alpha", [2.0, 4.0])
@pytest.mark.parametrize("top_k", [0, 3])
def test_low_temperature_log_ratio_identity_per_token(alpha, top_k):
    # q ∝ p^α on the top-k set ⇒ α ℓp − ℓq = log Σ_{v ∈ top-k} p(v)^α for every kept token;
    # on the full vocabulary that is (1 − α) times the Rényi entropy H_α.
    logits = jax.random.normal(jax.random.key(0), (6, 7)) * 2.0
    log_p, _ = js.token_log_probs(logits)
    log_q = js.proposal_log_probs(logits, js.Proposal(temperature=1.0 / alpha, top_k=top_k))
    kept = jnp.isfinite(log_q)
    log_z = jax.nn.logsumexp(jnp.where(kept, alpha * log_p, -jnp.inf), axis=-1, keepdims=True)
    difference = jnp.where(kept, alpha * log_p - log_q, log_z)
    np.testing.assert_allclose(difference, jnp.broadcast_to(log_z, difference.shape), atol=2e-5)
    if not top_k:
        renyi = jnp.log(jnp.sum(jnp.exp(log_p) ** alpha, axis=-1)) / (1 - alpha)
        np.testing.assert_allclose(log_z[:, 0], (1 - alpha) * renyi, atol=2e-5)


def test_cut_law_arguments():
    assert resolve_cut_law("uniform") is uniform
    assert resolve_cut_law("entropy") == entropy_jump(4.0)
    assert resolve_cut_law(entropy_jump(2.0)) == entropy_jump(2.0)
    with pytest.raises(ArgumentError, match="cut must be"):
        resolve_cut_law("surprisal")
    with pytest.raises(ArgumentError, match="beta"):
        entropy_jump(0.0)
    with pytest.raises(ArgumentError, match="beta"):
        resolve_cut_law(EntropyJump(0.0))


@pytest.mark.parametrize("alpha", [4.0, 50.0])
def test_log_ratio_keeps_float32_precision_on_long_suffixes(alpha):
    # A context-free model (one next-token law everywhere, flat enough that q = p^α / Z with
    # τ = 1/α still mixes at α = 50): the proposed suffix is the current one sorted,
    # so the exact log r of these float32 inputs is 0. α Σ ℓp and Σ ℓq are each ≈ α Σ ℓp
    # (10⁴–10⁵ here) and were summed apart, leaving an error of order ε·|α Σ ℓp|. Per token,
    # c(v) = α ℓp(v) − ℓq(v) = log Z_α up to rounding; the position-wise differences
    # d_t = c(x'_t) − c(x_t) have |d_t| ≤ D = spread of c over the drawn tokens and sum to 0,
    # so rounding each d_t (ε/2 · D) and summing N of them ((N − 1) ε · N D) leave ≤ N² ε D.
    n, cut, vocab = 1024, 7, 32
    logits = -0.02 * jnp.arange(vocab, dtype=jnp.float32)
    log_p_v, _ = js.token_log_probs(logits)
    log_q_v = js.proposal_log_probs(logits, js.Proposal(temperature=1.0 / alpha).validated())
    tokens = jax.random.categorical(jax.random.key(1), log_q_v, shape=(n,))
    rearranged = tokens.at[cut:].set(jnp.sort(tokens[cut:]))

    def trace(tokens):
        return Trace(tokens, log_p_v[tokens], log_q_v[tokens], jnp.zeros(n), jnp.int32(n))

    ratio = log_acceptance_ratio(jnp.int32(cut), jnp.float32(alpha), trace(tokens), trace(rearranged), uniform)
    per_token = np.asarray(jnp.float32(alpha) * log_p_v - log_q_v)[np.asarray(tokens)]
    bound = n**2 * np.finfo(np.float32).eps * (per_token.max() - per_token.min())
    assert abs(float(ratio.log_ratio)) <= bound
