"""`enumerate_completions` equals brute force over all token strings; toy-model errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import testing
from jaxsample.errors import ArgumentError


def _prompt_dependent_lm():
    # Any small LanguageModel: a 5-token vocabulary with two stop tokens (3, 4) whose logits
    # depend on the current and the previous token, prompt included.
    rng = np.random.default_rng(7)
    current, previous = (jnp.asarray(rng.normal(size=(5, 5)), jnp.float32) for _ in range(2))

    def logits_fn(tokens):
        before = jnp.concatenate([tokens[:1], tokens[:-1]])
        return current[tokens] + 0.5 * previous[before]

    return js.LanguageModel.from_logits_fn(logits_fn, 5, (3, 4), max_length=6, name="bigram")


def _brute_force(lm, prompt, max_new_tokens):
    """`{completion: log p}` over every token string, each scored by a teacher-forced
    forward pass of prompt + string (one batch per string length)."""
    stops = set(lm.eos_token_ids)
    out = {}
    for length in range(1, max_new_tokens + 1):
        strings = [s for s in itertools.product(range(lm.vocab_size), repeat=length)
                   if not any(t in stops for t in s[:-1])  # nothing after a stop token
                   and (length == max_new_tokens or s[-1] in stops)]  # finished
        logits = np.asarray(jax.jit(lm.logits)(jnp.asarray([prompt + s for s in strings])), np.float64)
        log_p = logits - np.asarray(jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True))
        rows = np.arange(len(prompt) - 1, len(prompt) - 1 + length)
        for s, table in zip(strings, log_p):
            out[s] = float(np.sum(table[rows, list(s)]))
    return out


@pytest.mark.parametrize("name", ["tabular", "prompt_dependent"])
def test_enumeration_equals_brute_force(name):
    if name == "tabular":
        lm, prompt, max_new_tokens, count = testing.random_tabular_lm(3, 4, seed=1), (0,), 4, 31
    else:
        lm, prompt, max_new_tokens, count = _prompt_dependent_lm(), (2, 1), 3, 53
    space = testing.enumerate_completions(lm, prompt, max_new_tokens)
    expected = _brute_force(lm, prompt, max_new_tokens)
    assert len(space.sequences) == count and set(space.sequences) == set(expected)
    np.testing.assert_allclose(space.log_p, [expected[x] for x in space.sequences],
                               rtol=0, atol=1e-5)  # float32 logits from two forward paths
    np.testing.assert_allclose(np.exp(space.log_p).sum(), 1.0, rtol=0, atol=1e-12)


def test_karan_du_example_and_block_states():
    space = testing.enumerate_completions(testing.karan_du_example(), [0], 2)
    law = dict(zip(space.sequences, np.exp(space.log_p)))
    np.testing.assert_allclose([law[(0, 1)], law[(1, 0)], law[(1, 1)], law[(0, 0)]],
                               [4 / 9, 5 / 18, 5 / 18, 0.0], atol=1e-7)
    # Block cap 1: the states are the one-token prefixes (and the stop token).
    assert space.states(cap=1) == [(0,), (1,), (2,)]
    target = testing.power_target(space, 2.0)
    np.testing.assert_allclose(target.prob((0, 1)), 0.16 / 0.285, rtol=1e-6)


def test_bad_inputs_raise():
    lm = testing.random_tabular_lm(4, 4)
    with pytest.raises(ArgumentError, match="more than max_completions=100"):
        testing.enumerate_completions(lm, [0], 4, max_completions=100)
    with pytest.raises(ArgumentError, match="exceeds the 5 positions"):
        testing.enumerate_completions(lm, [0, 1], 4)
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        testing.enumerate_completions(lm, [9], 4)
    with pytest.raises(ArgumentError, match=r"no row for prefix \(1,\)"):
        testing.tabular_lm({(): [0.0, 0.0, 0.0], (0,): [0.0, 0.0, 0.0]}, 3, 2, 2)
    with pytest.raises(ArgumentError, match="not NaN"):
        testing.tabular_lm({(): [0.0, np.nan]}, 2, 1, 1)
    space = testing.enumerate_completions(lm, [0], 4)
    with pytest.raises(ArgumentError, match="not an open prefix"):
        space.next_log_probs((3,))
