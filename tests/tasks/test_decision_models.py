"""p* as a LanguageModel, and exact accuracies computed from a model's own probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

import jaxsample as js
from jaxsample.errors import ArgumentError
from jaxsample.tasks import (
    DecisionTaskConfig,
    DecisionVocabulary,
    closed_form_accuracies,
    data_model,
    data_token_log_probs,
    decision_positions,
    exact_accuracies,
    grade,
    sample_problem,
    sample_traces,
)
from jaxsample.tasks.decisions import EOS, PAD, RIGHT

DEFAULT = DecisionTaskConfig()


@pytest.fixture(scope="module")
def p_star():
    return data_model(DEFAULT)


@jax.jit
def _log_softmax(lm, tokens):
    return jax.nn.log_softmax(lm.logits(tokens), axis=-1)


def _trace_log_probs(lm, problem, trace):
    """log p of each trace token, from one forward over the padded prompt + trace."""
    sequence = np.full(lm.max_length, PAD)
    length = len(problem.prompt) + len(trace)
    sequence[:length] = np.concatenate([problem.prompt, trace])
    log_p = np.asarray(_log_softmax(lm, sequence))
    positions = np.arange(len(problem.prompt) - 1, length - 1)
    return log_p[positions, sequence[positions + 1]]


def test_data_model_is_p_star(p_star):
    problem = sample_problem(0, DEFAULT, 3)
    corrupted = problem.correct_trace.copy()
    d0, d1 = DecisionVocabulary(DEFAULT).digit_ids
    corrupted[5] = d0 + d1 - corrupted[5]  # the other digit: a miscopy after R
    corrupted[9] = EOS  # the item's separator must be <sep>
    for trace in list(sample_traces(1, problem, 4)) + [corrupted]:
        expected, _ = data_token_log_probs(problem, trace)
        got = _trace_log_probs(p_star, problem, trace[: len(expected)])
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], atol=1e-6)
    impossible = np.isneginf(data_token_log_probs(problem, corrupted)[0])
    assert np.flatnonzero(impossible).tolist() == [5, 9]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_exact_accuracies_of_p_star_equal_the_closed_form(p_star, k):
    problem = sample_problem(k, DEFAULT, k)
    expected = closed_form_accuracies(DEFAULT, k, alpha=4.0)
    for max_enumerated in (4096, 1):  # enumerated stretches, then factorised
        got = exact_accuracies(p_star, problem, alpha=4.0, max_enumerated=max_enumerated)
        for field in ("base", "temperature", "power", "power_lower_bound"):
            assert getattr(got, field) == pytest.approx(getattr(expected, field), rel=1e-6), field
        np.testing.assert_allclose(got.decision_probs, expected.decision_probs, rtol=1e-6)
        np.testing.assert_allclose(got.continuation_probs, 1.0)


def test_miscalibrated_model_is_measured_by_its_own_probabilities():
    # Spec lesson 2: a model with P(R) = 0.296 (wrong options 0.352 each) has temperature-1/4
    # accuracy 0.296⁴ / (0.296⁴ + 2 · 0.352⁴) = 0.2000 per decision, not p*'s 0.2125. (The
    # spec quotes 0.2013, which corresponds to P(R) ≈ 0.2964, i.e. 0.296 before rounding.)
    config = DecisionTaskConfig(right_prob=0.296)
    got = exact_accuracies(data_model(config), sample_problem(0, config, 1), alpha=4.0)
    assert got.temperature == pytest.approx(0.296**4 / (0.296**4 + 2 * 0.352**4), rel=1e-5)
    assert got.temperature == pytest.approx(0.2000, abs=5e-5)
    assert got.decision_probs[0, 0] == pytest.approx(0.296, rel=1e-6)


def _noisy_model(config, off_logit, scale, seed):
    """p* with every impossible token given logit `off_logit` plus position/token-dependent
    noise: a model that leaves the format with real probability."""
    base = data_model(config)
    vocab_size = base.vocab_size
    shape = (config.max_sequence_length, vocab_size, vocab_size)
    noise = scale * jax.random.normal(jax.random.key(seed), shape)

    def logits_fn(tokens):
        logits = base.logits(tokens)
        logits = jnp.where(jnp.isfinite(logits), logits, off_logit)
        return logits + noise[jnp.arange(tokens.shape[0]), tokens]

    return js.LanguageModel.from_logits_fn(
        logits_fn, vocab_size, EOS, config.max_sequence_length, PAD)


def _batched_log_softmax(lm, rows, chunk=512):
    """float64 log-probabilities of `rows`, in padded fixed-size chunks (one compilation)."""
    padded = np.concatenate([rows, np.repeat(rows[:1], -len(rows) % chunk, 0)])
    out = [np.asarray(_log_softmax(lm, padded[i : i + chunk]))
           for i in range(0, len(padded), chunk)]
    return np.concatenate(out)[: len(rows)].astype(np.float64)


def _brute_force_power(lm, problem, alpha, trace_length):
    """log-weights α log p of every completion (first <eos>, or `trace_length` tokens),
    enumerated over the full vocabulary; returns (log Z, log Z over well-formed traces)."""
    prompt = problem.prompt
    frontier, frontier_log_p = np.zeros((1, 0), np.int64), np.zeros(1)
    states, formed = [], []
    options = np.arange(RIGHT, RIGHT + 1 + problem.config.num_wrong)
    digits = options[-1] + 1 + np.arange(problem.config.num_symbols)
    for depth in range(trace_length):
        rows = np.full((len(frontier), len(prompt) + trace_length), PAD)
        rows[:, : len(prompt)] = prompt
        rows[:, len(prompt) : len(prompt) + depth] = frontier
        log_p = _batched_log_softmax(lm, rows)[:, len(prompt) + depth - 1]
        next_tokens = np.tile(np.arange(log_p.shape[1]), len(frontier))[:, None]
        extended = np.concatenate([np.repeat(frontier, log_p.shape[1], 0), next_tokens], axis=1)
        extended_log_p = (frontier_log_p[:, None] + log_p).ravel()
        ends = (extended[:, -1] == EOS) | (depth == trace_length - 1)
        states.append(alpha * extended_log_p[ends])
        ok = ((np.isin(extended[ends, 0], options)) & (extended.shape[1] == trace_length)
              & np.all(np.isin(extended[ends, 1:-1], digits), axis=1) & (extended[ends, -1] == EOS))
        formed.append(alpha * extended_log_p[ends][ok])
        frontier, frontier_log_p = extended[~ends], extended_log_p[~ends]
    return logsumexp(np.concatenate(states)), logsumexp(np.concatenate(formed))


@pytest.mark.parametrize("off_logit, scale, min_gap, max_gap",
                         [(-2.5, 1.0, 0.5, 1.0), (-8.0, 0.3, 0.0, 1e-4)])
def test_power_bracket_contains_the_brute_force_value(off_logit, scale, min_gap, max_gap):
    # K = 1 is exact (no cross-item assumption), so full enumeration over every token
    # sequence must land inside [power_lower_bound, power], and the well-formed part of the
    # enumeration must reproduce `power` itself. A model far off the format needs the wide
    # bracket; one close to p* gets a tight one. The gap is relative (1 − lower/power): the
    # absolute width moves with the noise draw (0.002..0.8 over seeds), the relative gap
    # does not (≈ 0.98 wide, ≈ 1e-5 tight over seeds 0..3).
    config = DecisionTaskConfig(num_wrong=1, stretch_length=2, max_decisions=1)
    lm = _noisy_model(config, off_logit, scale, seed=0)
    problem = sample_problem(0, config, 1)
    alpha = 2.0
    got = exact_accuracies(lm, problem, alpha)
    log_z, log_z_formed = _brute_force_power(lm, problem, alpha, config.trace_length(1))
    log_p_correct = np.log(got.base)
    true_power = np.exp(alpha * log_p_correct - log_z)
    assert np.exp(alpha * log_p_correct - log_z_formed) == pytest.approx(got.power, rel=1e-5)
    assert got.power_lower_bound <= true_power * (1 + 1e-5) and true_power <= got.power * (1 + 1e-5)
    assert min_gap <= 1.0 - got.power_lower_bound / got.power <= max_gap
    log_p_trace = _trace_log_probs(lm, problem, problem.correct_trace)
    assert got.base == pytest.approx(np.exp(np.sum(log_p_trace)), rel=1e-6)


def test_exact_accuracies_reject_bad_arguments(p_star):
    problem = sample_problem(0, DEFAULT, 1)
    with pytest.raises(ArgumentError, match="alpha"):
        exact_accuracies(p_star, problem, alpha=0.5)
    small = data_model(DecisionTaskConfig(num_wrong=1))
    with pytest.raises(ArgumentError, match="tokens"):
        exact_accuracies(small, problem, alpha=4.0)


def test_generate_on_p_star_reproduces_temperature_accuracy_and_entropy_jumps(p_star):
    # The decode loop on the exact model: temperature-1/4 accuracy within 4 binomial standard
    # errors of 0.2125, and entropy jumps only at decision tokens.
    n, k = 2000, 1
    problem = sample_problem(5, DEFAULT, k)
    result = js.generate(jax.random.key(0), p_star, problem.prompt, DEFAULT.trace_length(k),
                         temperature=0.25, num_samples=n)
    expected = closed_form_accuracies(DEFAULT, k, alpha=4.0).temperature
    accuracy = grade(problem, np.asarray(result.tokens)).mean()
    assert abs(accuracy - expected) < 4 * np.sqrt(expected * (1 - expected) / n)
    jumps = np.diff(np.asarray(result.entropy), prepend=0.0, axis=1)
    for row in range(20):
        trace = np.asarray(result.tokens[row])
        np.testing.assert_array_equal(np.flatnonzero(jumps[row] > 1e-6),
                                      decision_positions(problem, trace))
