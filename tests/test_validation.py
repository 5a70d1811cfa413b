"""The shared argument checks: what they accept and how they report what they reject."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample.errors import ArgumentError
from jaxsample.training.grpo import policy_loss
from jaxsample.validation import check_int, check_int_array, check_key, check_real, check_scalar


@pytest.mark.parametrize("value", [3, np.int64(3), np.array(3), jnp.int32(3), np.array(3, np.int32)])
def test_check_int_accepts_integer_scalars(value):
    result = check_int("num_steps", value, 1)
    assert result == 3 and type(result) is int


@pytest.mark.parametrize(
    "value, shown",
    [(jnp.int32(0), "got 0"), (np.int64(-2), "got -2"), (True, "got True"), (jnp.array(True), "got Array(True"),
     (jnp.float32(2.0), "got Array(2."), (jnp.array([3]), "got Array([3]"), (None, "got None")],
)
def test_check_int_rejects(value, shown):
    with pytest.raises(ArgumentError, match=r"num_steps must be an integer in \[1, inf\], ") as error:
        check_int("num_steps", value, 1)
    assert shown in str(error.value)


def test_check_int_rejects_traced_values():
    with pytest.raises(ArgumentError, match="num_steps must be an integer"):
        jax.jit(lambda n: check_int("num_steps", n, 1))(3)


@pytest.mark.parametrize("value", [0.1, np.float32(0.1), jnp.float32(0.1), np.array(0.1)])
def test_check_real_accepts_real_scalars(value):
    assert check_real("alpha", value, "(0, 1)") is value


def test_check_real_names_none():
    with pytest.raises(ArgumentError, match=r"beta must be a number in \[0, inf\], got None"):
        check_real("beta", None, "[0, inf]")
    logp = jnp.zeros((2, 3))
    with pytest.raises(ArgumentError, match=r"beta must be a number in \[0, inf\], got None"):
        policy_loss(logp, None, logp, jnp.zeros(2), jnp.ones((2, 3), bool), beta=None)


def test_check_scalar_rejects_arrays_by_shape():
    assert check_scalar("gamma", jnp.float32(0.5), "(0, inf)") == 0.5
    with pytest.raises(ArgumentError, match=r"gamma must be a number in \(0, inf\), got an array of shape \(2,\)"):
        check_scalar("gamma", [0.1, 0.2], "(0, inf)")
    with pytest.raises(ArgumentError, match=r"gamma must be a number in \(0, inf\), got None"):
        check_scalar("gamma", None, "(0, inf)")


@pytest.mark.parametrize("values", [np.array([[0, 4], [2, 1]]), [3], jnp.arange(5), np.int64(4), np.zeros(0, np.int8)])
def test_check_int_array_returns_integers_in_range_unchanged(values):
    assert check_int_array("ids", values, 0, 5) is values


@pytest.mark.parametrize(
    "values, low, high, message",
    [
        (np.array([[0, 4], [2, 5]]), 0, 5, r"ids holds 5 at index \(1, 1\), outside the vocabulary \[0, 5\)"),
        (np.array([2**32 + 1], np.int64), 0, 5, r"ids holds 4294967297 at index \(0,\)"),  # 1 after an int32 cast
        (np.int64(-3), 0, None, r"ids holds -3, outside the vocabulary \[0, inf\)"),
        (np.array([7]), None, 5, r"ids holds 7 at index \(0,\), outside the vocabulary \[-inf, 5\)"),
        (np.array([1.0, 2.7]), 0, 5, "ids must hold integers, got dtype float64"),  # 2.7 would truncate to 2
        (np.array([True]), 0, 5, "ids must hold integers, got dtype bool"),
        (None, 0, 5, "ids must hold integers, got dtype object"),
    ],
)
def test_check_int_array_rejects(values, low, high, message):
    with pytest.raises(ArgumentError, match=message):
        check_int_array("ids", values, low, high, "the vocabulary")


def test_check_int_array_checks_the_dtype_of_traced_values_but_not_their_range():
    assert jax.jit(lambda v: check_int_array("ids", v, 0, 5) + 1)(jnp.array([9])).tolist() == [10]
    with pytest.raises(ArgumentError, match="ids must hold integers, got dtype float32"):
        jax.jit(lambda v: check_int_array("ids", v, 0, 5))(jnp.array([1.0]))


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(0), np.zeros(2, np.uint32)])
def test_check_key_accepts_typed_and_raw_keys_concrete_or_traced(key):
    assert check_key("key", key) is key
    jax.jit(lambda k: check_key("key", k))(key)


@pytest.mark.parametrize(
    "key, shown",
    [(0, "got 0"), ([0, 0], r"got \[0, 0\]"), (None, "got None"),
     (jnp.asarray([0, 0]), r"got an array of dtype int32 and shape \(2,\)"),
     (jax.random.split(jax.random.key(0)), r"got typed keys of shape \(2,\)"),
     (jax.random.split(jax.random.PRNGKey(0)), r"got an array of dtype uint32 and shape \(2, 2\)")],
)
def test_check_key_rejects(key, shown):
    with pytest.raises(ArgumentError, match=r"key must be one PRNG key, jax.random.key\(seed\) or a raw "
                                            r"jax.random.PRNGKey\(seed\) \(uint32\[2\]\), " + shown):
        check_key("key", key)


def test_sampler_entry_points_name_a_bad_key():
    """Each refuses a seed or list in place of a key before compiling (JAX raised 'invalid
    PRNG key data' or 'unexpected PRNG key type' from inside its random functions)."""
    lm = js.LanguageModel.from_logits_fn(lambda tokens: jnp.zeros(tokens.shape + (4,)), 4, 3, max_length=16)
    prompt = jnp.asarray([1, 2])
    calls = [
        lambda key: js.generate(key, lm, prompt, 4),
        lambda key: js.power_sample(key, lm, prompt, max_new_tokens=4, block_size=4),
        lambda key: js.base_sample(key, lm, prompt, max_new_tokens=4),
        lambda key: js.temperature_sample(key, lm, prompt, max_new_tokens=4),
        lambda key: js.best_of_n(key, lm, prompt, 2, max_new_tokens=4),
        lambda key: js.smc_decode(key, lm, prompt, num_particles=2, max_new_tokens=4),
        lambda key: js.twisted_smc(key, lm, prompt, None, None, lambda tokens, length: 0.0, num_particles=2,
                                   max_new_tokens=4),
    ]
    for call in calls:
        for key in (0, [0, 0]):
            with pytest.raises(ArgumentError, match="key must be one PRNG key"):
                call(key)
