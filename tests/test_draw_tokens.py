"""`categorical` draws exactly from softmax(logits); `draw_tokens`: each row's draw is
`categorical(key_r, log q_r)`, whether the rows are drawn together or in chunks, and the
chunks keep the `[rows, V]` temporaries small."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxsample.errors import ArgumentError
from jaxsample.sampling import Proposal, Twist, categorical, draw_tokens, proposal_log_probs, token_log_probs, twisted_log_probs
from jaxsample.sampling import proposal as proposal_module

ROWS, VOCAB, SLOTS = 12, 50, 7
LOGITS = 3.0 * jax.random.normal(jax.random.key(1), (ROWS, VOCAB))
KEYS = jax.random.split(jax.random.key(2), ROWS)
FORCED = jnp.where(jnp.arange(ROWS) % 3 == 0, jnp.arange(ROWS) % VOCAB, -1).astype(jnp.int32)
TOKENS = jax.random.randint(jax.random.key(3), (ROWS, SLOTS), 0, VOCAB)
LENGTH = jnp.arange(ROWS, dtype=jnp.int32) % SLOTS
FEATURES = jax.random.normal(jax.random.key(4), (ROWS, 5))


def _log_twist(params, tokens, length, features):
    # Depends on every input, and is -inf on a quarter of the vocabulary.
    prefix_sum = jnp.sum(jnp.where(jnp.arange(SLOTS) < length, tokens, 0))
    score = params * jnp.sin(0.1 * jnp.arange(VOCAB) * (1.0 + features[0]) + 0.01 * prefix_sum)
    return jnp.where(jnp.arange(VOCAB) % 4 == length % 4, -jnp.inf, score)


def _categorical_counts(logits, draws):
    keys = jax.random.split(jax.random.key(5), draws)
    tokens = jax.jit(jax.vmap(categorical, in_axes=(0, None)))(keys, jnp.asarray(logits, jnp.float32))
    return np.bincount(np.asarray(tokens), minlength=len(logits))


def _chi_square_p_value(counts, probs):
    support = probs > 0
    return stats.chisquare(counts[support], counts.sum() * probs[support]).pvalue


@pytest.mark.parametrize("vocab", [1, 2, 37, 1000])
def test_categorical_draws_exactly_from_the_softmax(vocab):
    # Blocks of 2, 2, 8 and 32 ids, the last one padded at V = 1, 37 and 1000; -inf ids, among them
    # the whole block of ids 8-15 at vocab 37, and one rare id of p ≈ 1e-3 sharing its block
    # with a likely one.
    logits = 2.0 * np.asarray(jax.random.normal(jax.random.key(vocab), (vocab,)), np.float64)
    if vocab >= 37:
        logits[8:16] = logits[3::7] = -np.inf
        logits[20] = 4.0
        logits[21] = -np.inf
        logits[21] = np.log(np.exp(logits).sum() / 999.0)  # p = 1/1000
    draws = 200_000
    counts = _categorical_counts(logits, draws)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert counts[probs == 0].sum() == 0
    if vocab == 1:
        assert counts.tolist() == [draws]
        return
    # Under the exact law a p-value below 1e-6 has probability 1e-6 (fixed key: deterministic).
    assert _chi_square_p_value(counts, probs) > 1e-6
    if vocab >= 37:
        # The rare id alone, by a z-test: |z| < 4 under the exact law (false alarm 6e-5),
        # while a law giving it 1.5 times its mass (≈ 300 expected draws instead of ≈ 200)
        # lies about 6 standard deviations away.
        def z(p):
            return (counts[21] - draws * p) / np.sqrt(draws * p * (1 - p))

        assert abs(z(probs[21])) < 4
        assert abs(z(1.5 * probs[21])) > 4


@pytest.mark.parametrize("shape", [(2, 5), (0,), ()])
def test_categorical_names_logits_of_the_wrong_shape(shape):
    with pytest.raises(ArgumentError, match=r"logits must have shape \[V\]"):
        categorical(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("keys", [jax.random.key(0), KEYS[:3], jax.random.PRNGKey(0),
                                  jax.random.split(jax.random.PRNGKey(0), 3)],
                         ids=["one key", "3 keys", "one raw key", "3 raw keys"])
def test_draw_tokens_names_keys_of_the_wrong_shape(keys):
    with pytest.raises(ArgumentError, match=rf"keys must hold one PRNG key per row of logits, shape \[B\] = \[{ROWS}\]"):
        draw_tokens(keys, LOGITS, Proposal())


def test_categorical_is_deterministic_per_key_and_independent_of_other_rows():
    logits = 3.0 * jax.random.normal(jax.random.key(6), (4, 49152))
    keys = jax.random.split(jax.random.key(7), 4)
    batched = jax.jit(jax.vmap(categorical))(keys, logits)
    alone = [int(categorical(keys[r], logits[r])) for r in range(4)]
    np.testing.assert_array_equal(batched, alone)
    assert len(set(alone)) > 1


# Boundary cases: the mass before a token equals top_p. The hand rule (and transformers'
# TopPLogitsWarper: it drops a token when the ascending cumulative mass up to and including it
# is <= 1 - top_p) keeps a token only if the mass strictly before it is < top_p; the rows are
# not sorted so the sort is exercised. Dyadic cases: the float32 probabilities are exact, so
# every partial mass is exact and sits exactly on top_p. [0.2, 0.5, 0.3] at 0.8 is not
# representable; in float32 the 0.2 token's mass before comes out as float32(0.8) == top_p
# on CPU, and transformers drops it (0.19999999 <= 1 - 0.8).
TOP_P_BOUNDARY = [
    ([0.25, 0.5, 0.25], 0.5, [0.0, 1.0, 0.0], True),
    ([0.125, 0.5, 0.375], 0.875, [0.0, 4 / 7, 3 / 7], True),
    ([0.2, 0.5, 0.3], 0.8, [0.0, 0.625, 0.375], False),
]


@pytest.mark.parametrize("probs, top_p, expected, dyadic", TOP_P_BOUNDARY)
def test_top_p_keeps_a_token_only_if_the_mass_before_it_is_below_top_p(probs, top_p, expected, dyadic):
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    if dyadic:
        np.testing.assert_array_equal(np.exp(proposal_log_probs(logits, Proposal(top_p=1.0).validated())), probs)
    q = np.exp(np.asarray(proposal_log_probs(logits, Proposal(top_p=top_p).validated())))
    np.testing.assert_array_equal(q > 0, np.asarray(expected) > 0)
    np.testing.assert_allclose(q, expected, rtol=1e-6)
    torch = pytest.importorskip("torch")
    warper = pytest.importorskip("transformers.generation.logits_process").TopPLogitsWarper(top_p)
    kept = torch.isfinite(warper(None, torch.tensor(np.asarray(logits))[None]))[0].numpy()
    np.testing.assert_array_equal(kept, q > 0)


PROPOSALS = {
    "tempered": Proposal(temperature=0.5),
    "top_k_top_p": Proposal(temperature=1.3, top_k=20, top_p=0.8),
    "twisted": Proposal(temperature=1.0, twist=Twist(_log_twist, jnp.float32(2.0))),
}


def _draw(proposal, forced, elements, monkeypatch):
    monkeypatch.setattr(proposal_module, "DRAW_ELEMENTS", elements)
    prefixes = (TOKENS, LENGTH, FEATURES) if proposal.twist is not None else None
    # A fresh function object: the patched constant is read when it is traced.
    return jax.jit(lambda k, l, p, f, x: draw_tokens(k, l, p, f, x))(KEYS, LOGITS, proposal.validated(), forced, prefixes)


@pytest.mark.parametrize("forced", [None, FORCED], ids=["sampled", "forced"])
@pytest.mark.parametrize("name", PROPOSALS)
def test_chunked_draws_equal_whole_batch_draws(name, forced, monkeypatch):
    whole = _draw(PROPOSALS[name], forced, ROWS * VOCAB, monkeypatch)
    chunked = _draw(PROPOSALS[name], forced, 4 * VOCAB + 3, monkeypatch)  # chunks of 4 rows (divides 12)
    np.testing.assert_array_equal(chunked.token, whole.token)
    for field in ("log_p", "log_q", "entropy", "log_twist"):
        np.testing.assert_allclose(getattr(chunked, field), getattr(whole, field), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PROPOSALS)
def test_each_row_is_its_own_categorical_draw(name, monkeypatch):
    proposal = PROPOSALS[name].validated()
    draw = _draw(proposal, FORCED, 5 * VOCAB, monkeypatch)  # 12 rows: chunks of 4 (largest divisor <= 5)
    log_p, entropy = token_log_probs(LOGITS)
    log_q = proposal_log_probs(LOGITS, proposal)
    log_twist = jnp.zeros_like(log_q)
    if proposal.twist is not None:
        log_twist = proposal.twist.log_values(TOKENS, LENGTH, FEATURES)
        log_q = twisted_log_probs(log_q, log_twist)
    close = dict(rtol=1e-5, atol=1e-5)  # jitted vs eager float32 log-softmaxes over 50 tokens
    for row in range(ROWS):
        sampled = int(categorical(KEYS[row], log_q[row]))
        expected = int(FORCED[row]) if FORCED[row] >= 0 else sampled
        assert int(draw.token[row]) == expected
        np.testing.assert_allclose(draw.log_p[row], log_p[row, expected], **close)
        np.testing.assert_allclose(draw.log_q[row], log_q[row, expected], **close)
        np.testing.assert_allclose(draw.entropy[row], entropy[row], **close)
        np.testing.assert_allclose(draw.log_twist[row], log_twist[row, expected], **close)


def test_each_row_draws_from_its_groups_proposal(monkeypatch):
    # 3 groups of 4 rows, drawn in chunks of 4 that take every third row: each chunk holds
    # rows of every group, so each row's τ and top-p must travel with it.
    temperature, top_p = jnp.array([0.5, 1.0, 2.0]), jnp.array([1.0, 0.7, 0.9])
    draw = _draw(Proposal(temperature=temperature, top_p=top_p), FORCED, 5 * VOCAB, monkeypatch)
    for row in range(ROWS):
        alone = Proposal(temperature=temperature[row // 4], top_p=top_p[row // 4]).validated()
        own = draw_tokens(KEYS[row:row + 1], LOGITS[row:row + 1], alone, FORCED[row:row + 1])
        assert int(draw.token[row]) == int(own.token[0]), row
        np.testing.assert_allclose(draw.log_q[row], own.log_q[0], rtol=1e-5, atol=1e-5, err_msg=f"row {row}")


def test_a_row_without_top_p_keeps_every_token_beside_truncated_rows():
    # Row 1's mass after its first token rounds to 1 in float32; top-p = 1 must still keep
    # all 50 tokens, as it does when no row truncates.
    logits = jnp.zeros((2, VOCAB)).at[:, 0].set(30.0)
    log_q = proposal_log_probs(logits, Proposal(top_p=jnp.array([0.5, 1.0])).validated())
    assert np.isfinite(log_q[1]).all() and np.isfinite(log_q[0]).sum() == 1
    np.testing.assert_array_equal(log_q[1], proposal_log_probs(logits[1], Proposal().validated()))


@pytest.mark.parametrize("offset", [1e4, 1e8, -1e8])
def test_twisted_log_probs_ignore_a_constant_in_the_twist(offset):
    # q ∝ q·ψ is unchanged by ψ -> e^c ψ. Added to log q before normalising, c = 1e8 rounded
    # log q to multiples of 8 (ulp(1e8)). The twist takes multiples of 8 so that log ψ + c
    # is exact in float32 and the function is given the same ψ up to the constant.
    log_q = proposal_log_probs(LOGITS, Proposal(temperature=1.0, top_k=20).validated())
    log_twist = 8.0 * jax.random.randint(jax.random.key(3), log_q.shape, -1, 2)
    expected = twisted_log_probs(log_q, log_twist)
    np.testing.assert_allclose(twisted_log_probs(log_q, log_twist + offset), expected, rtol=1e-5, atol=1e-5)
    # A large log ψ where q is 0 (top-k cut) is not on q's support and shifts nothing.
    off_support = jnp.where(jnp.isneginf(log_q), 1e30, log_twist)
    np.testing.assert_allclose(twisted_log_probs(log_q, off_support), expected, rtol=1e-5, atol=1e-5)


def _draw_temp_bytes(rows, vocab):
    logits = jax.ShapeDtypeStruct((rows, vocab), jnp.float32)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
    proposal = Proposal(temperature=0.5, top_p=0.9).validated()
    draw = jax.jit(lambda k, l, p: draw_tokens(k, l, p))  # traced now, with the current constant
    return draw.lower(keys, logits, proposal).compile().memory_analysis().temp_size_in_bytes


def test_chunks_bound_the_temporaries(monkeypatch):
    # A [rows, V] float32 array at 2^17 tokens is rows / 2 MiB; a draw holds several (log p,
    # log q, the block scores of the categorical draw, the top-p sort). In chunks of 16 rows
    # their size does not grow with the batch; drawn whole, it grows in proportion.
    vocab = 2**17
    monkeypatch.setattr(proposal_module, "DRAW_ELEMENTS", 16 * vocab)
    chunked_64, chunked_256 = _draw_temp_bytes(64, vocab), _draw_temp_bytes(256, vocab)
    monkeypatch.setattr(proposal_module, "DRAW_ELEMENTS", 64 * vocab)
    whole_64 = _draw_temp_bytes(64, vocab)
    assert chunked_256 < 1.1 * chunked_64
    assert whole_64 > 3 * chunked_64
