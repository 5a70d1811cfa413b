"""`js.generate`, proposals and the decode loop on a wrapped logits function."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import decoding
from jaxsample.rows import select_rows
from jaxsample.errors import ArgumentError, NumericalError

VOCAB = 6
EOS = 5


def _logits_fn(tokens):
    # A causal, position- and history-dependent toy: logits at t depend on tokens ≤ t.
    table = jax.random.normal(jax.random.key(7), (VOCAB, 11, VOCAB)) * 2.0
    history = jnp.cumsum(tokens) % 11
    return table[tokens, history]


@pytest.fixture(scope="module")
def lm():
    return js.LanguageModel.from_logits_fn(_logits_fn, VOCAB, EOS, max_length=24)


PROMPT = jnp.array([1, 2, 3], jnp.int32)


def _full_log_probs(lm, seq):
    return jax.nn.log_softmax(lm.logits(seq), axis=-1)


def test_log_p_log_q_entropy_match_recomputation(lm):
    proposal = js.Proposal(temperature=0.6, top_k=4, top_p=0.85)
    result = js.generate(jax.random.key(0), lm, PROMPT, 12, temperature=0.6, top_k=4, top_p=0.85, num_samples=16)
    # One batched forward over the padded rows: the model is causal, so the logits before a
    # row's length do not see its padding.
    sequences = jnp.concatenate([jnp.broadcast_to(PROMPT, (16, len(PROMPT))), result.tokens], axis=1)
    all_logits = lm.logits(sequences)[:, len(PROMPT) - 1 : -1]
    all_log_p, all_entropy = map(np.asarray, js.token_log_probs(all_logits))
    all_log_q = np.asarray(js.proposal_log_probs(all_logits, proposal))
    for row in range(16):
        n = int(result.lengths[row])
        gen = np.asarray(result.tokens[row, :n])
        log_p, entropy, log_q = all_log_p[row, :n], all_entropy[row, :n], all_log_q[row, :n]
        np.testing.assert_allclose(result.log_p[row, :n], log_p[np.arange(n), gen], atol=1e-5)
        np.testing.assert_allclose(result.log_q[row, :n], log_q[np.arange(n), gen], atol=1e-5)
        np.testing.assert_allclose(result.entropy[row, :n], entropy, atol=1e-5)
        assert np.all(np.asarray(result.tokens[row, n:]) == lm.pad_token_id)
        stops = np.asarray(lm.is_stop(gen))
        assert not stops[:-1].any()
        assert stops[-1] == bool(result.done[row])
        assert bool(result.done[row]) or n == 12


def test_proposal_log_probs_is_the_truncated_tempered_distribution():
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, top_k, top_p = 0.5, 4, 0.9
    scores = np.asarray(logits) / temperature
    keep = np.argsort(-scores)[:top_k]
    probs = np.exp(scores[keep] - scores[keep].max())
    probs /= probs.sum()
    cumulative_before = np.cumsum(probs) - probs
    keep = keep[cumulative_before < top_p]
    expected = np.full(6, -np.inf)
    expected[keep] = scores[keep] - np.log(np.exp(scores[keep]).sum())
    got = js.proposal_log_probs(logits, js.Proposal(temperature, top_k, top_p))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


def test_top_k_keeps_every_token_tied_with_the_kth():
    # What the generate docstring states: top_k=1 is greedy only without an exact tie at the max.
    logits = jnp.array([0.0, 5.0, 5.0, -1.0])
    got = js.proposal_log_probs(logits, js.Proposal(top_k=1))
    np.testing.assert_allclose(np.asarray(got), [-np.inf, -np.log(2), -np.log(2), -np.inf], atol=1e-6)


def test_empirical_token_frequencies_follow_log_q(lm):
    # 4000 first tokens; the largest binomial std of a frequency is sqrt(0.25/4000) ≈ 0.0079,
    # and 5 std keeps the false-alarm rate below 1e-5 per category.
    samples = 4000
    proposal = js.Proposal(temperature=1.3, top_k=0, top_p=0.8)
    result = js.generate(jax.random.key(3), lm, PROMPT, 1, temperature=1.3, top_k=0, top_p=0.8, num_samples=samples)
    q = np.exp(np.asarray(js.proposal_log_probs(lm.logits(PROMPT)[-1], proposal)))
    freq = np.bincount(np.asarray(result.tokens[:, 0]), minlength=VOCAB) / samples
    np.testing.assert_array_less(np.abs(freq - q), 5 * np.sqrt(q * (1 - q) / samples) + 1e-9)


def test_same_key_same_result_with_and_without_jit(lm):
    proposal = js.Proposal(0.9, 0, 1.0).validated()
    a = js.generate(jax.random.key(5), lm, PROMPT, 8, temperature=0.9, num_samples=3)
    b = js.generate(jax.random.key(5), lm, PROMPT, 8, temperature=0.9, num_samples=3)
    chex.assert_trees_all_equal(a, b)
    with jax.disable_jit():
        state = js.init_decode(lm, PROMPT, 3, 8)
        state, _ = js.extend(jax.random.key(5), lm, state, 8, proposal)
    np.testing.assert_array_equal(state.tokens, a.tokens)
    np.testing.assert_allclose(state.log_q, a.log_q, atol=1e-6)


def test_rewind_then_extend_matches_fresh_decoding(lm):
    proposal = js.Proposal(1.0).validated()
    state = js.init_decode(lm, PROMPT, 4, 10)
    state, _ = js.extend(jax.random.key(1), lm, state, 10, proposal)
    cut = jnp.minimum(jnp.array([0, 1, 3, 5]), state.length)
    rewound = js.rewind(lm, state, cut)
    fresh = js.init_decode(lm, PROMPT, 4, 10)
    # Re-decode the kept prefix token by token from a fresh state.
    for j in range(int(cut.max())):
        keep = j < cut
        token = jnp.where(keep, state.tokens[:, j], lm.pad_token_id)
        logits, cache = lm.decode(token, fresh.cache, prefix=fresh.prompt_cache.value)
        cache = cache._replace(length=jnp.where(keep, cache.length, fresh.cache.length))
        fresh = fresh._replace(
            cache=cache, next_logits=jnp.where(keep[:, None], logits, fresh.next_logits)
        )
    np.testing.assert_allclose(rewound.next_logits, fresh.next_logits, atol=1e-6)
    np.testing.assert_array_equal(rewound.cache.length, fresh.cache.length)
    # A row cut at its full length keeps its stop token; every shorter cut reopens it.
    np.testing.assert_array_equal(rewound.done, state.done & (cut == state.length))


def test_one_advance_refeeds_cut_rows_while_the_others_draw(lm):
    # power_sample restarts some chains while the others decode, in one model step.
    proposal = js.Proposal(1.0).validated()
    state = js.init_decode(lm, PROMPT, 4, 10)
    state, _ = js.extend(jax.random.key(1), lm, state, 6, proposal)
    cut = jnp.minimum(jnp.array([0, 2, 6, 6]), state.length)
    refeed = cut < state.length
    keys = decoding.fold_in_rows(jax.random.key(2), 4)
    limit = decoding.row_limits(state, 10)
    assert np.any(refeed) and np.any(decoding.extendable(state, limit) & ~refeed)
    mixed = decoding.advance(lm, decoding.truncate(lm, state, cut), keys, limit, proposal, refeed=refeed)
    expected = select_rows(refeed, js.rewind(lm, state, cut), decoding.advance(lm, state, keys, limit, proposal))
    chex.assert_trees_all_close(mixed, expected, atol=1e-6)


def test_extend_takes_one_key_or_a_key_per_row(lm):
    proposal = js.Proposal(1.0).validated()
    state = js.init_decode(lm, PROMPT, 4, 10)
    expected, _ = js.extend(jax.random.key(3), lm, state, 10, proposal)
    row_keys = decoding.fold_in_rows(jax.random.key(3), 4)
    for key in (jax.random.PRNGKey(3), row_keys, jax.random.key_data(row_keys)):
        chex.assert_trees_all_equal(js.extend(key, lm, state, 10, proposal)[0], expected)
    assert len({tuple(row) for row in np.asarray(expected.tokens)}) > 1


def test_temperature_and_top_p_changes_do_not_recompile(lm):
    from jaxsample.generation import _generate

    js.generate(jax.random.key(0), lm, PROMPT, 6, temperature=0.7, top_k=0, top_p=0.9, num_samples=2)
    before = _generate._cache_size()
    for temperature, top_p in [(0.3, 0.5), (1.7, 1.0), (0.9, 0.99)]:
        js.generate(jax.random.key(1), lm, PROMPT, 6, temperature=temperature, top_k=0, top_p=top_p, num_samples=2)
    assert _generate._cache_size() == before


def test_decode_loop_traces_once_across_float_changes(lm):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(key, proposal):
        state = js.init_decode(lm, PROMPT, 2, 6)
        return js.extend(key, lm, state, 6, proposal)[0].tokens

    for temperature in (0.5, 1.0, 2.0):
        run(jax.random.key(0), js.Proposal(temperature, 0, 0.9).validated())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=40), "positions"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_bad_sampler_arguments_raise(lm, kwargs, message):
    args = dict(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, num_samples=1) | kwargs
    with pytest.raises(ArgumentError, match=message):
        js.generate(jax.random.key(0), lm, PROMPT, **args)


def test_nan_logits_are_detected_and_reported():
    def broken(tokens):
        logits = _logits_fn(tokens)
        return jnp.where(jnp.arange(tokens.shape[0])[:, None] >= 5, jnp.nan, logits)

    lm = js.LanguageModel.from_logits_fn(broken, VOCAB, EOS, max_length=24, name="broken")
    with pytest.raises(NumericalError, match="broken"):
        js.generate(jax.random.key(0), lm, PROMPT, 8, num_samples=4)


@pytest.mark.parametrize("prompt", [[1, VOCAB], [-1, 2]])
def test_out_of_vocabulary_prompt_raises(lm, prompt):
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        js.generate(jax.random.key(0), lm, jnp.array(prompt), 4)


def test_prompt_lengths_in_one_bucket_share_a_compilation_and_match_unpadded(lm):
    from jaxsample.generation import _generate

    proposal = js.Proposal(0.8).validated()
    js.generate(jax.random.key(0), lm, jnp.array([1, 2]), 6, temperature=0.8, num_samples=3)
    compiled = _generate._cache_size()
    for prompt in ([1, 2, 3], [4, 1, 2, 2, 3]):
        padded = js.generate(jax.random.key(9), lm, jnp.array(prompt), 6, temperature=0.8, num_samples=3)
        state = js.init_decode(lm, jnp.array(prompt), 3, 6)
        state, _ = js.extend(jax.random.key(9), lm, state, 6, proposal)
        np.testing.assert_array_equal(padded.tokens, state.tokens)
        np.testing.assert_allclose(padded.log_q, state.log_q, atol=1e-6)
    assert _generate._cache_size() == compiled


def test_samplers_share_compilations_across_prompt_lengths(lm):
    from jaxsample.mcmc.blocks import _power_sample
    from jaxsample.smc.sampler import _run

    for prompt in ([1, 2], [3, 4, 1], [2, 2, 2, 1]):
        js.power_sample(jax.random.key(0), lm, jnp.array(prompt), alpha=2.0, num_chains=2,
                        block_size=4, num_mcmc_steps=2, max_new_tokens=4)
        js.smc_decode(jax.random.key(0), lm, jnp.array(prompt), num_particles=4, max_new_tokens=4,
                      alpha=2.0, block_size=2)
        if prompt == [1, 2]:
            compiled = (_power_sample._cache_size(), _run._cache_size())
    assert (_power_sample._cache_size(), _run._cache_size()) == compiled


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 2.0**-126, 1e-30])
@pytest.mark.parametrize("truncation", [dict(), dict(top_k=2), dict(top_p=0.5)])
def test_tiny_temperatures_give_the_greedy_law_not_nan(temperature, truncation):
    # Logits of an LLM's size (tens): logits / τ overflowed float32 for τ < 30 / 3.4e38 and
    # gave NaN log q. The limit is greedy among the tied maxima, also for a traced τ that
    # float32 cannot hold (0, or the subnormal 1e-40, flushed to 0 on CPU).
    logits = jnp.array([[10.0, 30.0, 30.0, -jnp.inf, 20.0], [-25.0, 31.0, 29.0, 0.0, 30.5]])
    got = jax.jit(js.proposal_log_probs)(logits, js.Proposal(jnp.float32(temperature), **truncation))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(np.exp(got), [[0, 0.5, 0.5, 0, 0], [0, 1, 0, 0, 0]], rtol=1e-6, atol=0)


def test_generate_at_the_smallest_temperature_decodes_greedily():
    # τ = 2⁻¹²⁶, the smallest accepted, on logits up to ~80: every token is the argmax, with
    # log q = 0 (the old logits / τ overflowed: NaN log q and token 0 at every step).
    lm = js.LanguageModel.from_logits_fn(lambda tokens: 10.0 * _logits_fn(tokens), VOCAB, EOS, max_length=24)
    result = js.generate(jax.random.key(0), lm, PROMPT, 8, temperature=2.0**-126, num_samples=2)
    greedy = js.generate(jax.random.key(1), lm, PROMPT, 8, temperature=1.0, top_k=1, num_samples=2)
    np.testing.assert_array_equal(result.tokens, greedy.tokens)
    np.testing.assert_array_equal(result.log_q, 0.0)


@pytest.mark.parametrize("temperature", [1e-46, 1e-40, 1e38, 1e39])
def test_temperatures_float32_cannot_hold_are_refused(lm, temperature):
    # 1e-46 rounds to 0 in float32 and 1e-40 is subnormal (flushed to 0); above 2¹²⁶ the
    # reciprocal XLA multiplies by is subnormal. The bounds themselves are accepted.
    with pytest.raises(ArgumentError, match=r"temperature must lie in \[1.175e-38, 8.507e\+37\]"):
        js.generate(jax.random.key(0), lm, PROMPT, 4, temperature=temperature)
    with pytest.raises(ArgumentError, match="temperature"):
        js.power_sample(jax.random.key(0), lm, PROMPT, alpha=2.0, num_chains=2, block_size=4,
                        num_mcmc_steps=1, max_new_tokens=4, temperature=temperature)
    for bound in (2.0**-126, 2.0**126):
        assert js.Proposal(bound).validated().temperature == bound
