"""`js.score`: teacher-forced log p equals what the decode loop recorded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import models
from jaxsample.errors import ArgumentError
from tests.models.test_kv_cache import CONFIG, random_params

# The bound: score and generate's log p agree to 1e-5 in float32.
ATOL = 1e-5
VOCAB = 6
EOS = 5


def _toy_logits(tokens):
    table = jax.random.normal(jax.random.key(7), (VOCAB, 11, VOCAB)) * 2.0
    return table[tokens, jnp.cumsum(tokens) % 11]


@pytest.fixture(scope="module")
def tiny():
    # Unit-scale params give logit std ≈ 10; halving the head keeps log p in a range where
    # 1e-5 absolute is the f32 resolution of the comparison, not a looser bound.
    params = random_params(CONFIG, 0)
    return models.make_language_model(CONFIG, params, name="tiny")


@pytest.fixture(scope="module")
def toy():
    return js.LanguageModel.from_logits_fn(_toy_logits, VOCAB, EOS, max_length=24)


@pytest.mark.parametrize("model", ["tiny", "toy"])
def test_score_equals_generated_log_p_and_entropy(model, request):
    lm = request.getfixturevalue(model)
    prompt = jnp.asarray([1, 2, 3, 4], jnp.int32)
    # 32 rows: on the tiny model 8 rows of 12 tokens all miss the stop token for 8 of 20 keys,
    # 32 rows for none of them.
    result = js.generate(jax.random.key(0), lm, prompt, 12, num_samples=32)
    assert len(set(np.asarray(result.lengths).tolist())) > 1  # ragged rows exercise the pads
    log_p, entropy = js.score(lm, prompt, result.tokens, result.lengths, with_entropy=True)
    np.testing.assert_allclose(log_p, result.log_p, atol=ATOL, rtol=0)
    np.testing.assert_allclose(entropy, result.entropy, atol=ATOL, rtol=0)
    np.testing.assert_allclose(js.score(lm, prompt, result.tokens, result.lengths), log_p, atol=0)


def test_score_ragged_prompts_equals_row_by_row(tiny):
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (3, 6)), jnp.int32)
    prompt_lengths = jnp.asarray([2, 6, 4])
    completions = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (3, 5)), jnp.int32)
    lengths = jnp.asarray([5, 0, 3])
    log_p = js.score(tiny, prompts, completions, lengths, prompt_lengths=prompt_lengths)
    for row in range(3):
        p, n = int(prompt_lengths[row]), int(lengths[row])
        sequence = jnp.concatenate([prompts[row, :p], completions[row]])
        expected = jax.nn.log_softmax(tiny.logits(sequence), -1)[p - 1 : p - 1 + n][jnp.arange(n), completions[row, :n]]
        np.testing.assert_allclose(log_p[row, :n], expected, atol=ATOL)
        np.testing.assert_array_equal(log_p[row, n:], 0.0)


def test_score_rejects_bad_input(toy):
    prompt = jnp.asarray([1, 2], jnp.int32)
    completions = jnp.asarray([[1, 2, 3]], jnp.int32)
    with pytest.raises(ArgumentError, match=r"lengths holds 4 at index \(0,\), outside the completion slots \[0, 4\)"):
        js.score(toy, prompt, completions, jnp.asarray([4]))
    with pytest.raises(ArgumentError, match=r"completions holds 9 at index \(0, 1\), outside the vocabulary"):
        js.score(toy, prompt, jnp.asarray([[1, 9, 3]]), jnp.asarray([2]))
    # ids after the length are ignored, not checked
    js.score(toy, prompt, jnp.asarray([[1, 9, 3]]), jnp.asarray([1]))
    with pytest.raises(ArgumentError, match="prompt_lengths holds 0"):
        js.score(toy, prompt, completions, jnp.asarray([3]), prompt_lengths=0)
    with pytest.raises(ArgumentError, match="completions must have shape"):
        js.score(toy, prompt, completions[0], jnp.asarray([3]))
    with pytest.raises(ArgumentError, match="exceeds the 24 positions"):
        js.score(toy, prompt, jnp.ones((1, 23), jnp.int32), jnp.asarray([3]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(completions=np.array([[1.7, 2.9, 3.0]])), "completions must hold integers, got dtype float64"),
        (dict(completions=np.array([[2**32 + 1, 2, 3]], np.int64)), r"completions holds 4294967297 at index \(0, 0\), outside"),
        (dict(prompt=np.array([0.9, 2.0])), "prompt must hold integers, got dtype float64"),
        (dict(prompt=np.array([2**32 + 1, 2], np.int64)), r"prompt holds 4294967297 at index \(0,\), outside the vocabulary \[0, "),
        (dict(lengths=np.array([2.9])), "lengths must hold integers, got dtype float64"),
        (dict(prompt_lengths=np.float32(1.5)), "prompt_lengths must hold integers, got dtype float32"),
        (dict(prompt_lengths=np.int64(2**32 + 1)), "prompt_lengths holds 4294967297, outside"),
    ],
    ids=["float ids", "int64 ids", "float prompt", "int64 prompt", "float lengths", "float prompt_lengths",
         "int64 prompt_lengths"],
)
def test_score_checks_ids_and_lengths_before_the_int32_cast(toy, bad, match):
    # Cast first, a float id or length truncated and an int64 one wrapped into range.
    args = dict(prompt=np.array([1, 2]), completions=np.array([[1, 2, 3]]), lengths=np.array([3]))
    args.update(bad)
    with pytest.raises(ArgumentError, match=match):
        js.score(toy, **args)
