"""Model internals on `LanguageModel`: features, hidden states, per-layer functions and
feature recording in the decode loop (Flax port and wrapped logits functions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import models
from jaxsample.decoding import extend, init_decode, rewind
from jaxsample.errors import ArgumentError
from tests.models.test_kv_cache import CONFIG, random_params

# Prefill/decode vs full forward differ by summation order only (see test_kv_cache): ≤ 1e-6.
ATOL = 1e-5
VOCAB = 6
EOS = 5


@pytest.fixture(scope="module")
def lm():
    return models.make_language_model(CONFIG, random_params(CONFIG, 0), name="tiny")


def _toy_logits(tokens):
    table = jax.random.normal(jax.random.key(7), (VOCAB, 11, VOCAB)) * 2.0
    return table[tokens, jnp.cumsum(tokens) % 11]


def _toy_features(tokens):
    return jnp.stack([jnp.cumsum(tokens), tokens * 2], axis=-1).astype(jnp.float32)


@pytest.fixture(scope="module")
def toy():
    return js.LanguageModel.from_logits_fn(_toy_logits, VOCAB, EOS, max_length=24)


def _tokens(seed, shape, vocab=CONFIG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, size=shape), jnp.int32)


def test_features_hidden_states_and_layer_functions_agree(lm):
    tokens = _tokens(0, (2, 7))
    logits, features = lm.logits_and_features(tokens)
    hidden = lm.hidden_states(tokens)
    assert features.shape == (2, 7, lm.feature_size) and lm.feature_size == CONFIG.hidden_size
    assert hidden.shape == (CONFIG.num_hidden_layers + 1, 2, 7, CONFIG.hidden_size)
    np.testing.assert_array_equal(logits, lm.logits(tokens))
    np.testing.assert_array_equal(features, lm.features(tokens))
    h = lm.embed(tokens)
    np.testing.assert_array_equal(hidden[0], h)
    for i in range(lm.num_layers):
        h = lm.apply_layer(i, h)
        np.testing.assert_allclose(hidden[i + 1], h, atol=ATOL)
    np.testing.assert_allclose(lm.final_logits(h), logits, atol=ATOL)
    # features are the final norm of the last block's output; the head maps them to logits
    np.testing.assert_allclose(models.unembed(lm.params, CONFIG, features), logits, atol=ATOL)
    # unbatched input drops the batch axis everywhere
    np.testing.assert_array_equal(lm.features(tokens[1]), features[1])
    np.testing.assert_array_equal(lm.hidden_states(tokens[1]), hidden[:, 1])


def test_apply_layer_at_last_equals_the_full_layer_at_the_last_position(lm):
    h = lm.embed(_tokens(2, (2, 6)))
    for i in range(lm.num_layers):
        full = lm.apply_layer(i, h)
        np.testing.assert_allclose(lm.apply_layer_at_last(i, h[:, :-1], h[:, -1]), full[:, -1], atol=ATOL)
        h = full
    # a one-token sequence has no context
    np.testing.assert_allclose(lm.apply_layer_at_last(0, h[:, :0], h[:, 0]), lm.apply_layer(0, h[:, :1])[:, 0], atol=ATOL)


def test_prefill_and_decode_return_features_of_the_fed_token(lm):
    tokens = _tokens(1, (3, 9))
    lengths = jnp.asarray([4, 9, 6])
    logits, features, cache = lm.prefill(tokens, lengths, lm.init_cache(3, 12), with_features=True)
    plain_logits, _ = lm.prefill(tokens, lengths, lm.init_cache(3, 12))
    np.testing.assert_array_equal(logits, plain_logits)
    full = lm.features(tokens)
    np.testing.assert_allclose(features, full[jnp.arange(3), lengths - 1], atol=ATOL)
    fed = _tokens(2, (3,))
    _, step_features, _ = lm.decode(fed, cache, with_features=True)
    for row in range(3):
        sequence = jnp.concatenate([tokens[row, : lengths[row]], fed[row : row + 1]])
        np.testing.assert_allclose(step_features[row], lm.features(sequence)[-1], atol=ATOL)


@pytest.mark.parametrize("model", ["lm", "toy"])
def test_generate_records_the_features_of_each_generated_token(model, request):
    lm = request.getfixturevalue(model)
    lm = lm.replace(eos_token_ids=(lm.vocab_size,))  # no stops: one sequence shape to compile
    prompt = jnp.asarray([1, 2, 3], jnp.int32)
    key = jax.random.key(3)
    plain = js.generate(key, lm, prompt, 10, num_samples=3)
    recorded = js.generate(key, lm, prompt, 10, num_samples=3, record_features=True)
    assert plain.features is None
    np.testing.assert_array_equal(recorded.tokens, plain.tokens)
    np.testing.assert_array_equal(recorded.log_p, plain.log_p)
    assert recorded.features.shape == (3, 10, lm.feature_size)
    for row in range(3):
        n = int(recorded.lengths[row])
        expected = lm.features(jnp.concatenate([prompt, recorded.tokens[row, :n]]))[len(prompt) :]
        np.testing.assert_allclose(recorded.features[row, :n], expected, atol=ATOL)


def test_rewind_and_extend_keep_features_consistent(lm):
    prompt = jnp.asarray([4, 8, 15, 16], jnp.int32)
    proposal = js.Proposal().validated()
    plain = init_decode(lm, prompt, 3, 8)
    assert plain.features is None and plain.next_features is None
    state = init_decode(lm, prompt, 3, 8, record_features=True)
    np.testing.assert_allclose(state.next_features, jnp.repeat(lm.features(prompt)[-1:], 3, 0), atol=ATOL)
    state, _ = extend(jax.random.key(0), lm.replace(eos_token_ids=(CONFIG.vocab_size,)), state, 8, proposal)
    state = rewind(lm, state, jnp.asarray([0, 3, 5]))
    for row, kept in enumerate([0, 3, 5]):
        np.testing.assert_array_equal(state.features[row, kept:], 0.0)
    state, _ = extend(jax.random.key(1), lm.replace(eos_token_ids=(CONFIG.vocab_size,)), state, 8, proposal)
    for row in range(3):
        full = lm.features(jnp.concatenate([prompt, state.tokens[row]]))
        np.testing.assert_allclose(state.features[row], full[4:], atol=ATOL)
        np.testing.assert_allclose(state.next_features[row], full[-1], atol=ATOL)


def test_wrapped_logits_function_features(toy):
    tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    logits, features = toy.logits_and_features(tokens)
    assert toy.feature_size == VOCAB
    np.testing.assert_array_equal(features, logits)
    custom = js.LanguageModel.from_logits_fn(_toy_logits, VOCAB, EOS, max_length=24, features_fn=_toy_features)
    assert custom.feature_size == 2
    np.testing.assert_array_equal(custom.features(tokens)[0], _toy_features(tokens[0]))
    result = js.generate(jax.random.key(0), custom, tokens[0], 6, num_samples=2, record_features=True)
    n = int(result.lengths[0])
    expected = _toy_features(jnp.concatenate([tokens[0], result.tokens[0, :n]]))[4:]
    np.testing.assert_array_equal(result.features[0, :n], expected)


def test_wrapped_logits_function_rejects_layer_access(toy):
    tokens = jnp.asarray([1, 2, 3], jnp.int32)
    for call in (
        lambda: toy.hidden_states(tokens),
        lambda: toy.embed(tokens),
        lambda: toy.num_layers,
        lambda: toy.apply_layer(0, jnp.zeros((1, 3, 4))),
        lambda: toy.with_intervention(js.Intervention(lambda i, h, p: h, None, (0,))),
    ):
        with pytest.raises(ArgumentError, match="wrapped logits function"):
            call()
    with pytest.raises(ArgumentError, match="wrapped logits function"):
        toy.replace(intervention=js.Intervention(lambda i, h, p: h, None, (0,))).logits(tokens)
    with pytest.raises(ArgumentError, match="features_fn"):
        js.LanguageModel.from_logits_fn(_toy_logits, VOCAB, EOS, max_length=24, features_fn=lambda t: t)


@pytest.mark.parametrize("kept", [5, 4, 0])
def test_wrapped_model_rows_decode_on_a_prefix_of_any_length_as_the_full_sequence(toy, kept):
    """A prefix as prefill returns it (length P = its capacity), or rewound, is continued by
    every row exactly: slot s of a row is position kept + s, up to the row's capacity."""
    prompt = _tokens(0, (5,), VOCAB)
    _, prefix = toy.prefill(prompt[None], jnp.asarray([5]), toy.init_cache(1, 5))
    prefix = prefix._replace(length=jnp.asarray([kept], jnp.int32))
    rows = _tokens(1, (2, 4), VOCAB)
    cache = toy.init_cache(2, 4)
    for step in range(4):
        logits, cache = toy.decode(rows[:, step], cache, prefix=prefix)
        for row in range(2):
            full = _toy_logits(jnp.concatenate([prompt[:kept], rows[row, : step + 1]]))[-1]
            np.testing.assert_array_equal(logits[row], full)
    logits, _ = toy.decode(rows[:, 0], cache, prefix=prefix)  # the rows are at capacity
    assert np.isnan(logits).all()


def test_wrapped_model_rows_continue_their_groups_prefix(toy):
    """A two-row prefix (kept lengths 3 and 5) continued by two rows each."""
    prompts = _tokens(3, (2, 5), VOCAB)
    kept = jnp.asarray([3, 5])
    _, prefix = toy.prefill(prompts, kept, toy.init_cache(2, 5))
    rows = _tokens(4, (4, 3), VOCAB)
    cache = toy.init_cache(4, 3)
    for step in range(3):
        logits, cache = toy.decode(rows[:, step], cache, prefix=prefix)
        for row in range(4):
            group = row // 2
            full = _toy_logits(jnp.concatenate([prompts[group, : int(kept[group])], rows[row, : step + 1]]))[-1]
            np.testing.assert_array_equal(logits[row], full)


def test_wrapped_model_prefill_gives_nan_for_rows_without_a_last_token(toy):
    """As the Flax ports: a length outside [1, T] has no last token, so NaN, not a wrapped
    read of the last slot (length 0) or of a slot past the prompt."""
    tokens = _tokens(2, (3, 4), VOCAB)
    logits, features, cache = toy.prefill(tokens, jnp.asarray([0, 3, 5]), toy.init_cache(3, 8), with_features=True)
    assert np.isnan(logits[0]).all() and np.isnan(logits[2]).all()
    np.testing.assert_array_equal(logits[1], _toy_logits(tokens[1])[2])
    np.testing.assert_array_equal(features, logits)
    with pytest.raises(ArgumentError, match=r"lengths must have shape \[B\] = \(3,\) .* got \(1,\)"):
        toy.prefill(tokens, jnp.asarray([3]), toy.init_cache(3, 8))


@pytest.mark.parametrize("bad", [-1, VOCAB, 2.0])
def test_wrapped_model_rejects_token_ids_outside_the_vocabulary(toy, bad):
    tokens = np.asarray([1, bad])
    message = r"must hold integers" if isinstance(bad, float) else rf"holds {bad} .*vocabulary \[0, {VOCAB}\)"
    with pytest.raises(ArgumentError, match=message):
        toy.logits(tokens)
    with pytest.raises(ArgumentError, match=message):
        toy.decode(tokens, toy.init_cache(2, 4))
