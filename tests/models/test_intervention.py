"""Residual-stream interventions: in prefill, every decode step, full forwards and scoring."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import models
from jaxsample.errors import ArgumentError
from tests.models.test_kv_cache import ATOL, CONFIG, random_params

LAYERS = (0, 2)


def add_vector(layer, h, params):
    """Adds the layer's steering vector: params `[L, D]`."""
    return h + params[layer]


def state_feedback(layer, h, params, x):
    """A-LQR-shaped feedback: u = (β − vᵀx) d, from the block input x."""
    alpha = params["beta"][layer] - x @ params["v"][layer]
    return h + alpha[..., None] * params["d"][layer]


@pytest.fixture(scope="module")
def lm():
    return models.make_language_model(CONFIG, random_params(CONFIG, 0), name="tiny")


def _vectors(seed, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), (CONFIG.num_hidden_layers, CONFIG.hidden_size))


def _by_hand(lm, tokens, edit, edit_from):
    """Full forward of `tokens [T]` through embed / apply_layer / final_logits, calling
    `edit(layer, h_out, h_in)` at positions ≥ edit_from after the blocks in LAYERS."""
    h = lm.embed(tokens[None])
    for i in range(lm.num_layers):
        out = lm.apply_layer(i, h)
        if i in LAYERS:
            out = out.at[:, edit_from:].set(edit(i, out, h)[:, edit_from:])
        h = out
    return lm.final_logits(h)[0]


def test_zero_intervention_gives_bit_identical_tokens(lm):
    steered = lm.with_intervention(js.Intervention(add_vector, jnp.zeros((3, CONFIG.hidden_size)), LAYERS, "all"))
    prompt = jnp.asarray([5, 9, 14, 2, 7], jnp.int32)
    plain = js.generate(jax.random.key(0), lm, prompt, 12, num_samples=4)
    same = js.generate(jax.random.key(0), steered, prompt, 12, num_samples=4)
    np.testing.assert_array_equal(same.tokens, plain.tokens)
    np.testing.assert_array_equal(same.lengths, plain.lengths)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_steered_generation_equals_the_edit_made_by_hand(lm, positions):
    vectors = _vectors(1)
    lm = lm.replace(eos_token_ids=(CONFIG.vocab_size,))  # no stops: one sequence shape to compile
    steered = lm.with_intervention(js.Intervention(add_vector, vectors, LAYERS, positions))
    prompt = jnp.asarray([5, 9, 14, 2, 7], jnp.int32)
    result = js.generate(jax.random.key(1), steered, prompt, 8, num_samples=3)
    plain = js.generate(jax.random.key(1), lm, prompt, 8, num_samples=3)
    assert not np.array_equal(result.log_p, plain.log_p)  # the edit matters
    edit_from = 0 if positions == "all" else len(prompt) - 1
    for row in range(3):
        n = int(result.lengths[row])
        sequence = jnp.concatenate([prompt, result.tokens[row, :n]])
        logits = _by_hand(lm, sequence, lambda i, out, _: out + vectors[i], edit_from)
        log_p = jax.nn.log_softmax(logits, -1)[len(prompt) - 1 : -1][jnp.arange(n), result.tokens[row, :n]]
        np.testing.assert_allclose(result.log_p[row, :n], log_p, atol=ATOL)
        np.testing.assert_allclose(
            steered.forward(sequence, intervene_from=edit_from), logits, atol=ATOL
        )
    np.testing.assert_allclose(js.score(steered, prompt, result.tokens, result.lengths), result.log_p, atol=ATOL)


def test_feedback_reads_the_block_input(lm):
    keys = jax.random.split(jax.random.key(2), 3)
    params = {
        "beta": jax.random.normal(keys[0], (3,)),
        "v": jax.random.normal(keys[1], (3, CONFIG.hidden_size)) / np.sqrt(CONFIG.hidden_size),
        "d": 0.3 * jax.random.normal(keys[2], (3, CONFIG.hidden_size)),
    }
    steered = lm.with_intervention(js.Intervention(state_feedback, params, LAYERS, "all", reads_block_input=True))
    tokens = jnp.asarray([3, 1, 4, 1, 5, 9], jnp.int32)
    expected = _by_hand(lm, tokens, lambda i, out, x: state_feedback(i, out, params, x), 0)
    np.testing.assert_allclose(steered.logits(tokens), expected, atol=ATOL)
    hidden = steered.hidden_states(tokens)
    np.testing.assert_allclose(steered.final_logits(hidden[-1]), expected, atol=ATOL)
    # prefill + decode step reproduce the same last-position logits
    logits, cache = steered.prefill(tokens[None, :5], jnp.asarray([5]), steered.init_cache(1, 8))
    np.testing.assert_allclose(logits[0], expected[4], atol=ATOL)
    logits, _ = steered.decode(tokens[5:], cache)
    np.testing.assert_allclose(logits[0], expected[5], atol=ATOL)


def test_prefill_last_edits_each_rows_last_real_token(lm):
    vectors = _vectors(3)
    steered = lm.with_intervention(js.Intervention(add_vector, vectors, LAYERS, "last"))
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 0, 0]], jnp.int32)
    lengths = jnp.asarray([6, 4])
    logits, _ = steered.prefill(tokens, lengths, steered.init_cache(2, 8))
    for row in range(2):
        sequence = tokens[row, : lengths[row]]
        expected = _by_hand(lm, sequence, lambda i, out, _: out + vectors[i], len(sequence) - 1)
        np.testing.assert_allclose(logits[row], expected[-1], atol=ATOL)


def test_changing_intervention_params_does_not_recompile(lm):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def last_logits(model, tokens):
        return model.logits(tokens)[-1]

    tokens = jnp.asarray([1, 2, 3], jnp.int32)
    outputs = [
        last_logits(lm.with_intervention(js.Intervention(add_vector, _vectors(seed), LAYERS)), tokens)
        for seed in (4, 5)
    ]
    assert not np.allclose(outputs[0], outputs[1])


def test_bad_interventions_are_rejected(lm):
    with pytest.raises(ArgumentError, match=r"layer 3 is outside \[0, 3\)"):
        lm.with_intervention(js.Intervention(add_vector, _vectors(0), (0, 3)))
    with pytest.raises(ArgumentError, match=r"layer -1 is outside"):
        lm.with_intervention(js.Intervention(add_vector, _vectors(0), (-1,)))
    with pytest.raises(ArgumentError, match="positions must be one of"):
        lm.with_intervention(js.Intervention(add_vector, _vectors(0), (0,), "first"))
    with pytest.raises(ArgumentError, match="layers must be a non-empty tuple"):
        lm.with_intervention(js.Intervention(add_vector, _vectors(0), [0]))
    # set without the check: the decoder still refuses at trace time
    with pytest.raises(ArgumentError, match=r"layer 7 is outside"):
        lm.replace(intervention=js.Intervention(add_vector, _vectors(0), (7,))).logits(jnp.asarray([1, 2]))
