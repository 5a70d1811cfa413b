"""The checks every sampler entry point shares: prompts (`check_prompt`) and NaN log p
(`check_finite_log_p`), exercised through each public sampler."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample.errors import ArgumentError, NumericalError

VOCAB = 6
EOS = 5
KEY = jax.random.key(0)
PROMPT = np.array([1, 2, 3], np.int32)
NAN_FROM = 5  # absolute position whose logits turn NaN: generated position 5 - 3 + 1 = 3


def _logits_fn(tokens):
    table = jax.random.normal(jax.random.key(7), (VOCAB, 11, VOCAB)) * 2.0
    return table[tokens, jnp.cumsum(tokens) % 11]


def _nan_logits_fn(tokens):
    return jnp.where(jnp.arange(tokens.shape[0])[:, None] >= NAN_FROM, jnp.nan, _logits_fn(tokens))


SAMPLERS = {
    "generate": lambda lm, prompt, n: js.generate(KEY, lm, prompt, n, num_samples=8),
    "power_sample": lambda lm, prompt, n: js.power_sample(
        KEY, lm, prompt, alpha=2.0, num_chains=8, block_size=n, num_mcmc_steps=2, max_new_tokens=n),
    "base_sample": lambda lm, prompt, n: js.base_sample(KEY, lm, prompt, num_chains=8, max_new_tokens=n),
    "temperature_sample": lambda lm, prompt, n: js.temperature_sample(
        KEY, lm, prompt, alpha=2.0, num_chains=8, max_new_tokens=n),
    "best_of_n": lambda lm, prompt, n: js.best_of_n(
        KEY, lm, prompt, num_candidates=2, num_chains=4, max_new_tokens=n),
    "smc_decode": lambda lm, prompt, n: js.smc_decode(KEY, lm, prompt, num_particles=8, max_new_tokens=n),
}


BATCHABLE = {  # (key, lm, prompt or batch of prompts, **settings) -> result
    "generate": lambda key, lm, prompt, **kw: js.generate(key, lm, prompt, 4, num_samples=3, **kw),
    "base_sample": lambda key, lm, prompt, **kw: js.base_sample(key, lm, prompt, num_chains=3, max_new_tokens=4,
                                                                **kw),
    "temperature_sample": lambda key, lm, prompt, **kw: js.temperature_sample(key, lm, prompt, num_chains=3,
                                                                              max_new_tokens=4, **kw),
    "best_of_n": lambda key, lm, prompt, **kw: js.best_of_n(key, lm, prompt, 3, num_chains=3, max_new_tokens=4,
                                                            token_budget=6, **kw),
}
# Settings that may differ per prompt of a batch: one value per prompt of the three below.
PER_PROMPT = {
    "generate": dict(temperature=[1.0, 0.5, 2.0], top_p=[1.0, 0.8, 1.0]),
    "base_sample": dict(temperature=[0.5, 1.0, 1.0], top_p=[0.8, 1.0, 0.9]),
    "temperature_sample": dict(alpha=[2.0, 1.0, 4.0]),
    "best_of_n": dict(temperature=[2.0, 1.0, 0.5]),
}


@pytest.fixture(scope="module")
def lm():
    return js.LanguageModel.from_logits_fn(_logits_fn, VOCAB, EOS, max_length=24)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_reports_nan_logits_with_row_and_position(sampler):
    broken = js.LanguageModel.from_logits_fn(_nan_logits_fn, VOCAB, EOS, max_length=24, name="broken")
    with pytest.raises(NumericalError, match=r"model 'broken' .* at \w+ \d+, generated position 3$"):
        SAMPLERS[sampler](broken, PROMPT, 4)


def test_finite_check_names_the_first_bad_row_and_position(lm):
    log_p = np.zeros((3, 4), np.float32)
    log_p[1, 2] = np.nan
    log_p[2, 3] = -np.inf  # past row 2's length: padding, not checked
    js.decoding.check_finite_log_p(lm, log_p, np.array([4, 2, 3]))  # NaN and -inf in padding
    with pytest.raises(NumericalError, match="chain 1, generated position 2"):
        js.decoding.check_finite_log_p(lm, log_p, np.array([4, 3, 4]), rows="chain")
    log_p[1, 2] = -np.inf
    with pytest.raises(NumericalError, match="chain 1, generated position 2$"):
        js.decoding.check_finite_log_p(lm, log_p, np.array([4, 3, 4]), rows="chain")


def test_rejected_mh_proposals_with_nan_are_reported_not_hidden(lm):
    """A proposal decoded by a NaN model is rejected by the MH step; its info records the
    first non-finite position, which power_sample turns into a NumericalError."""
    broken = js.LanguageModel.from_logits_fn(_nan_logits_fn, VOCAB, EOS, max_length=24, name="broken")
    proposal = js.Proposal(temperature=1.0).validated()
    state = js.mcmc.init(jax.random.key(1), lm, PROMPT, 16, 6, proposal)  # finite chains
    assert np.all(np.asarray(js.decoding.first_non_finite(state.decode.log_p, state.decode.length)) == -1)
    _, info = js.mcmc.build_kernel(broken, js.mcmc.uniform, proposal)(jax.random.key(2), state, 2.0, 6)
    cut, decoded = np.asarray(info.cut), np.asarray(info.tokens_decoded)
    first_nan = np.maximum(NAN_FROM - len(PROMPT) + 1, cut)  # the suffix comes from the NaN model
    expected = np.where(cut + decoded > first_nan, first_nan, -1)
    np.testing.assert_array_equal(info.non_finite, expected)
    assert (expected >= 0).any() and not np.asarray(info.accepted)[expected >= 0].any()
    row = int(np.flatnonzero(expected >= 0)[0])
    with pytest.raises(NumericalError, match=rf"chain {row}, generated position {expected[row]}, block 0, MH step 0$"):
        js.decoding.raise_on_non_finite(broken, np.asarray(info.non_finite)[None, None], "chain", ("block", "MH step"))


@pytest.mark.parametrize("sampler", BATCHABLE)
def test_a_batch_of_prompts_gives_each_prompt_the_rows_of_its_own_call(lm, sampler):
    prompts = [np.array([1, 2, 3]), np.array([4, 1]), np.array([2, 2, 0, 1, 3])]
    keys = jax.random.split(KEY, len(prompts))
    settings = PER_PROMPT[sampler]
    batch = BATCHABLE[sampler](keys, lm, prompts, **{name: jnp.asarray(v) for name, v in settings.items()})
    assert batch.tokens.shape == (9, 4)
    for p, prompt in enumerate(prompts):
        own = {name: values[p] for name, values in settings.items()}
        alone, rows = BATCHABLE[sampler](keys[p], lm, prompt, **own), slice(3 * p, 3 * p + 3)
        for name in ("tokens", "lengths", "done") + (("tokens_decoded",) if sampler != "generate" else ()):
            np.testing.assert_array_equal(getattr(batch, name)[rows], getattr(alone, name), err_msg=f"{name}, prompt {p}")
        np.testing.assert_allclose(batch.log_p[rows], alone.log_p, atol=1e-6, err_msg=f"log_p, prompt {p}")
    assert len({tuple(row) for row in np.asarray(batch.tokens)}) > 3


BATCH_SETTINGS = {  # sampler -> (call on (keys, lm, prompts, **settings), its per-prompt settings)
    **{name: (BATCHABLE[name], tuple(PER_PROMPT[name])) for name in BATCHABLE},
    "power_sample": (lambda key, lm, prompt, **kw: js.power_sample(
        key, lm, prompt, num_chains=2, block_size=4, num_mcmc_steps=1, max_new_tokens=4, **kw),
        ("alpha", "temperature", "top_p")),
    "smc_decode": (lambda key, lm, prompt, **kw: js.smc_decode(
        key, lm, prompt, lambda tokens, length: 0.0, num_particles=2, max_new_tokens=4, **kw),
        ("alpha", "lam", "temperature", "top_p")),
}


@pytest.mark.parametrize("sampler", BATCH_SETTINGS)
def test_per_prompt_settings_need_one_value_per_prompt(lm, sampler):
    call, names = BATCH_SETTINGS[sampler]
    keys, prompts = jax.random.split(KEY, 2), [[1, 2, 3], [4, 1]]
    for name in names:
        with pytest.raises(ArgumentError, match=rf"^{name} must be one number, or one per prompt \(shape \[2\]\), "
                                                 r"got shape \(3,\)$"):
            call(keys, lm, prompts, **{name: jnp.full(3, 0.5)})
        with pytest.raises(ArgumentError, match=rf"^{name} must be one number, got shape \(1,\)$"):
            call(KEY, lm, PROMPT, **{name: jnp.full(1, 0.5)})
    with pytest.raises(ArgumentError, match=r"^ess_threshold must be one number, got shape \(2,\)$"):
        js.smc_decode(keys, lm, prompts, num_particles=2, max_new_tokens=4, ess_threshold=jnp.full(2, 0.5))


def test_init_decode_refuses_ragged_rows(lm):
    with pytest.raises(ArgumentError, match=r"prompt_tokens must have shape \[T\] or \[P, T\], got a list of rows of "
                                            r"different lengths \(pad them: decoding.pad_prompts\)"):
        js.decoding.init_decode(lm, [[1, 2, 3], [4, 1]], 4, 4)


def test_best_of_n_budgets_broadcast_over_prompts_and_chains(lm):
    keys, prompts = jax.random.split(KEY, 2), [[1, 2, 3], [4, 1]]
    per_prompt = js.best_of_n(keys, lm, prompts, 4, num_chains=2, max_new_tokens=4, token_budget=[[4], [16]])
    first, second = (js.best_of_n(keys[p], lm, prompts[p], 4, num_chains=2, max_new_tokens=4, token_budget=budget)
                     for p, budget in enumerate((4, 16)))
    np.testing.assert_array_equal(per_prompt.tokens_decoded, np.concatenate([first.tokens_decoded, second.tokens_decoded]))
    with pytest.raises(ArgumentError, match=r"token_budget must broadcast to \[P, C\] = \[2, 2\] \(prompts, chains\), got shape \(3,\)"):
        js.best_of_n(keys, lm, prompts, 4, num_chains=2, max_new_tokens=4, token_budget=[1, 2, 3])


BAD_PROMPTS = {
    "float ids": (np.array([1.0, 2.7]), "prompt_tokens must hold integers, got dtype float64"),
    "bool ids": (np.array([True, False]), "prompt_tokens must hold integers, got dtype bool"),
    "int64 id that wraps to 5 in int32": (np.array([1, 2**32 + 5], np.int64), f"{2**32 + 5} at index \\(1,\\), outside"),
    "int64 id 2^31": (np.array([2**31], np.int64), f"{2**31} at index \\(0,\\), outside"),
    "negative id": (np.array([-1, 2]), r"-1 at index \(0,\), outside"),
    "python floats": ([1.0, 2.0], "dtype float64"),
    "empty": (np.zeros((0,), np.int32), "at least one token"),
    "matrix": (np.zeros((2, 2), np.int32), r"shape \[T\], got \(2, 2\)"),
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("case", BAD_PROMPTS)
def test_every_sampler_rejects_non_integer_and_out_of_range_prompts(lm, sampler, case):
    prompt, message = BAD_PROMPTS[case]
    if case == "matrix":  # a batch of 2 prompts, which needs 2 keys
        message = "key must be 2 PRNG keys"
    with pytest.raises(ArgumentError, match=message):
        SAMPLERS[sampler](lm, prompt, 4)


def test_init_decode_checks_prompts_before_the_cast(lm):
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        js.init_decode(lm, np.array([2**32 + 5]), 2, 4)
    with pytest.raises(ArgumentError, match="dtype float32"):
        js.init_decode(lm, np.ones((2, 3), np.float32), 2, 4)


PROMPTS = np.array([[1, 2, 3], [4, 1, 2]], np.int32)
BAD_PROMPT_LENGTHS = {
    "zero": (lambda lm: js.init_decode(lm, PROMPTS, 2, 4, prompt_lengths=np.array([3, 0])),
             r"prompt_lengths holds 0 at index \(1,\), outside the prompt width \[1, 4\)"),
    "negative": (lambda lm: js.init_decode(lm, PROMPTS, 2, 4, prompt_lengths=np.array([3, -1])), "holds -1"),
    "past the prompt": (lambda lm: js.init_decode(lm, PROMPTS, 2, 4, prompt_lengths=[3, 5]), "holds 5"),
    "float": (lambda lm: js.init_decode(lm, PROMPTS, 2, 4, prompt_lengths=np.array([3.0, 2.5])),
              "prompt_lengths must hold integers, got dtype float64"),
    "scalar for [B, T]": (lambda lm: js.init_decode(lm, PROMPTS, 2, 4, prompt_lengths=2),
                          r"prompt_lengths must be shape \[P\] = \[2\], got shape \(\)"),
    "[T] prompt": (lambda lm: js.init_decode(lm, PROMPT, 2, 4, prompt_lengths=4), "prompt_length holds 4"),
    "[1] for [T]": (lambda lm: js.init_decode(lm, PROMPT, 2, 4, prompt_lengths=np.array([2])),
                    r"prompt_length must be a scalar for a \[T\] prompt, got shape \(1,\)"),
    "mcmc.init": (lambda lm: js.mcmc.init(KEY, lm, PROMPT, 2, 4, js.Proposal().validated(), prompt_length=0),
                  "prompt_length holds 0"),
    "smc.init": (lambda lm: js.smc.init(lm, PROMPT, 2, 4, prompt_length=9), "prompt_length holds 9"),
}


def test_init_decode_shares_each_of_several_prompts_within_its_group_of_rows(lm):
    lengths = np.array([3, 2])
    own = js.init_decode(lm, PROMPTS, 2, 4, prompt_lengths=lengths)  # one row per prompt
    shared = js.init_decode(lm, PROMPTS, 6, 4, prompt_lengths=lengths)  # three rows per prompt
    assert own.prompt_cache is None and shared.prompt_cache.value.length.shape == (2,)
    np.testing.assert_array_equal(shared.prompt_length, [3, 3, 3, 2, 2, 2])
    np.testing.assert_array_equal(shared.last_prompt_token, [3, 3, 3, 1, 1, 1])
    np.testing.assert_allclose(shared.next_logits, np.repeat(own.next_logits, 3, axis=0), atol=1e-6)
    with pytest.raises(ArgumentError, match="num_rows=5 must be a multiple of the 2 prompts given"):
        js.init_decode(lm, PROMPTS, 5, 4)
    with pytest.raises(ArgumentError, match="take_rows moves rows between prompts"):
        js.decoding.take_rows(shared, jnp.arange(6))


def test_long_prompts_are_prefilled_a_few_at_a_time(monkeypatch):
    from jaxsample import models
    from tests.models.test_kv_cache import CONFIG, random_params
    lm = models.make_language_model(CONFIG, random_params(CONFIG, 0), name="tiny")
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (5, 16)), jnp.int32)
    lengths = jnp.array([16, 3, 9, 1, 12], jnp.int32)
    at_once = js.init_decode(lm, prompts, 10, 4, prompt_lengths=lengths)
    monkeypatch.setattr(js.decoding, "PREFILL_TOKENS", 32)  # 2 prompts per call: 3 calls, the last one redoing prompt 3
    assert "scan" in str(jax.make_jaxpr(lambda p, n: js.decoding.prefill_prompts(lm, p, n))(prompts, lengths))
    in_calls = js.init_decode(lm, prompts, 10, 4, prompt_lengths=lengths)
    chex.assert_trees_all_close(in_calls, at_once, atol=1e-5)


@pytest.mark.parametrize("case", BAD_PROMPT_LENGTHS)
def test_init_decode_rejects_prompt_lengths_outside_the_prompt(lm, case):
    # Unchecked, a length of 0 or past T gave NaN first-token log p ([B, T] prompts) or decoded
    # from a wrapped / clamped prompt position ([T] prompt).
    init, message = BAD_PROMPT_LENGTHS[case]
    with pytest.raises(ArgumentError, match=message):
        init(lm)


def test_numpy_integers_are_accepted_as_counts(lm):
    prompt = np.array([1, 2, 3], np.int64)
    result = js.generate(KEY, lm, prompt, np.int64(6), top_k=np.int32(3), num_samples=np.int64(2))
    assert result.tokens.shape == (2, 6)
    result = js.power_sample(KEY, lm, prompt, alpha=np.float32(2.0), num_chains=np.int64(2),
                             block_size=np.int64(3), num_mcmc_steps=np.int64(1), max_new_tokens=np.int64(6))
    assert result.tokens.shape == (2, 6)


@pytest.mark.parametrize("value", [True, 2.0, "4", None])
def test_non_integer_counts_are_rejected_with_value_and_range(lm, value):
    with pytest.raises(ArgumentError, match=rf"max_new_tokens must be an integer in \[1, inf\], got {value!r}"):
        js.generate(KEY, lm, PROMPT, value)


def test_rejected_smc_rejuvenation_proposals_with_nan_are_reported(lm):
    broken = js.LanguageModel.from_logits_fn(_nan_logits_fn, VOCAB, EOS, max_length=24, name="broken")
    proposal = js.Proposal(temperature=1.0).validated()
    state = js.smc.init(lm, PROMPT, 16, 6)
    decode, _ = js.extend(jax.random.key(1), lm, state.particles.decode, 6, proposal)
    particles = state.particles._replace(decode=decode)
    move = js.smc.build_move(broken, js.smc.make_target(2.0, 0.0, None), proposal, None, js.mcmc.uniform)
    moved, accepted, _, non_finite = move(jax.random.key(2), particles, 6)
    flagged = np.asarray(non_finite) >= 0
    assert flagged.any() and np.all(np.asarray(non_finite)[flagged] >= NAN_FROM - len(PROMPT) + 1)
    assert not np.asarray(accepted)[flagged].any()
    assert np.all(np.asarray(js.decoding.first_non_finite(moved.decode.log_p, moved.decode.length)) == -1)
