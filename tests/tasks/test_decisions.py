"""The decision task's data distribution p*: closed forms, sampling, grading, tokenizer."""

import itertools
import json
import re

import jax
import numpy as np
import pytest
import tokenizers
import transformers

from jaxsample.errors import ArgumentError, ConfigError
from jaxsample.models import Tokenizer
from jaxsample.tasks import (
    DecisionProblem,
    DecisionTaskConfig,
    DecisionVocabulary,
    closed_form_accuracies,
    data_log_prob,
    data_token_log_probs,
    decision_positions,
    grade,
    parse_prompt,
    read_task_config,
    sample_batch,
    sample_problem,
    sample_traces,
    write_tokenizer,
)
from jaxsample.tasks.decisions import BOS, EOS, GO, ITEM, NONE, PAD, RIGHT, SEP

DEFAULT = DecisionTaskConfig()
SECOND = DecisionTaskConfig(right_prob=0.4, num_wrong=1, stretch_length=4, num_symbols=4)


def binomial_tolerance(p, n, sigmas=4.0):
    """4 standard errors of a Bernoulli(p) mean over n draws: a fixed-seed test of a correct
    sampler fails with probability < 1e-4."""
    return sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("config, k, base, temperature", [
    (DEFAULT, 1, 0.300, 0.213), (DEFAULT, 2, 0.090, 0.045), (DEFAULT, 4, 0.008, 0.002),
    (SECOND, 1, 0.400, 0.165), (SECOND, 2, 0.160, 0.027),
])
def test_closed_form_matches_spec_table(config, k, base, temperature):
    acc = closed_form_accuracies(config, k, alpha=4.0)
    assert round(acc.base, 3) == base
    assert round(acc.temperature, 3) == temperature
    assert round(acc.power, 3) == 1.000 and acc.power < 1.0
    assert acc.power_lower_bound == acc.power


@pytest.mark.parametrize("config, decision_entropy, wrong_stretch_entropy", [
    (DEFAULT, 1.10, 0.69), (SECOND, 0.67, 1.39)])
def test_entropies_match_spec_table(config, decision_entropy, wrong_stretch_entropy):
    problem = sample_problem(0, config, 1)
    wrong = problem.correct_trace.copy()
    wrong[0] = RIGHT + 1
    _, entropy = data_token_log_probs(problem, wrong)
    assert round(entropy[0], 2) == decision_entropy
    stretch = entropy[1 : 1 + config.stretch_length]
    np.testing.assert_allclose(stretch, wrong_stretch_entropy, atol=5e-3)
    _, entropy_right = data_token_log_probs(problem, problem.correct_trace)
    np.testing.assert_array_equal(entropy_right[1:], 0.0)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_monte_carlo_accuracy_matches_closed_form(k, temperature):
    n = 20_000
    problem = sample_problem(k, DEFAULT, k)
    traces = sample_traces(np.random.default_rng(10 + k), problem, n, temperature=temperature)
    target = closed_form_accuracies(DEFAULT, k, alpha=4.0, temperature=temperature).temperature
    assert abs(grade(problem, traces).mean() - target) < binomial_tolerance(target, n)


def test_power_accuracy_matches_self_normalised_importance_sampling():
    # A config where p^α accuracy is far from 1, so the estimate has something to match:
    # per item 0.09 / (0.09 + 2 · 0.35² · 2^-1) = 0.4235 at α = 2.
    config = DecisionTaskConfig(stretch_length=1)
    alpha, n = 2.0, 20_000
    problem = sample_problem(3, config, 2)
    traces = sample_traces(np.random.default_rng(4), problem, n)
    log_w = (alpha - 1) * np.array([data_log_prob(problem, t) for t in traces])
    w = np.exp(log_w - log_w.max())
    correct = grade(problem, traces)
    estimate = np.sum(w * correct) / np.sum(w)
    # Delta-method standard error of a self-normalised estimate; 4 of them.
    se = np.sqrt(np.sum(w**2 * (correct - estimate) ** 2)) / np.sum(w)
    exact = closed_form_accuracies(config, 2, alpha).power
    assert exact == pytest.approx(0.4235**2, abs=1e-4)
    assert abs(estimate - exact) < 4 * se


def test_data_log_prob_normalises_and_scores_traces():
    config = DecisionTaskConfig(stretch_length=2, max_decisions=2)
    vocab = DecisionVocabulary(config)
    problem = DecisionProblem(config, (2, 1))  # digits 10 and 01

    def item(option, digits, separator):
        return [option, *(vocab.first_digit + np.array(digits)), separator]

    stretches = list(itertools.product(range(2), repeat=2))
    total = sum(
        np.exp(data_log_prob(problem, item(o1, s1, SEP) + item(o2, s2, EOS)))
        for o1, s1, o2, s2 in itertools.product(
            vocab.option_ids, stretches, vocab.option_ids, stretches))
    assert total == pytest.approx(1.0, abs=1e-12)

    right, wrong = RIGHT, RIGHT + 1
    d0, d1 = vocab.first_digit, vocab.first_digit + 1
    trace = np.array([right, d1, d0, SEP, wrong, d1, d1, EOS, PAD, PAD])  # pads after <eos> ignored
    assert data_log_prob(problem, trace) == pytest.approx(np.log(0.3 * 0.35 * 0.25))
    assert data_log_prob(problem, trace[:3]) == pytest.approx(np.log(0.3))  # prefix probability
    miscopied = trace.copy()
    miscopied[2] = d1
    assert data_log_prob(problem, miscopied) == -np.inf
    no_separator = trace.copy()
    no_separator[3] = EOS
    assert data_log_prob(problem, no_separator) == -np.inf


def test_entropy_jumps_land_exactly_on_decisions():
    problem = sample_problem(0, DEFAULT, 4)
    for trace in sample_traces(1, problem, 20):
        _, entropy = data_token_log_probs(problem, trace)
        jumps = np.diff(entropy, prepend=0.0)
        np.testing.assert_array_equal(np.flatnonzero(jumps > 0), decision_positions(problem, trace))
    assert decision_positions(problem, problem.correct_trace[:11]).tolist() == [0, 10]


def test_grade():
    problem = sample_problem(2, DEFAULT, 2)
    correct = problem.correct_trace
    assert grade(problem, correct)
    assert grade(problem, np.concatenate([correct, [PAD] * 5]))
    assert not grade(problem, correct[:-1])
    wrong_decision = correct.copy()
    wrong_decision[10] = RIGHT + 2  # the digits still copy the value: still wrong
    assert not grade(problem, wrong_decision)
    batch = np.stack([correct, wrong_decision, np.roll(correct, 1)])
    np.testing.assert_array_equal(grade(problem, batch), [True, False, False])
    with pytest.raises(ArgumentError):
        grade(problem, batch[None])


def test_sample_batch_is_p_star_training_data():
    tokens, loss_mask = sample_batch(np.random.default_rng(0), DEFAULT, 4096)
    assert tokens.dtype == np.int32
    assert tokens.shape == (4096, DEFAULT.max_sequence_length) == (4096, 82)
    again, _ = sample_batch(np.random.default_rng(0), DEFAULT, 4096)
    np.testing.assert_array_equal(tokens, again)
    rights = decisions = 0
    for row, mask in zip(tokens[:512], loss_mask[:512]):
        start, end = np.flatnonzero(mask)[[0, -1]]
        assert start == DEFAULT.prompt_length
        problem = parse_prompt(DEFAULT, row[:start])
        trace = row[start : end + 1]
        assert np.isfinite(data_log_prob(problem, trace)) and trace[-1] == EOS
        assert np.all(row[end + 1 :] == PAD) and not mask[end + 1 :].any()
        positions = decision_positions(problem, trace)
        rights += np.sum(trace[positions] == RIGHT)
        decisions += len(positions)
    counts = np.bincount(np.sum(loss_mask, axis=1) // DEFAULT.item_length, minlength=5)[1:]
    assert np.all(np.abs(counts / 4096 - 0.25) < binomial_tolerance(0.25, 4096))
    assert abs(rights / decisions - 0.3) < binomial_tolerance(0.3, decisions)


def test_randomness_sources_are_explicit_and_reproducible():
    key = jax.random.key(3)
    assert sample_problem(key, DEFAULT, 4) == sample_problem(key, DEFAULT, 4)
    raw_key = jax.random.PRNGKey(3)
    assert sample_problem(raw_key, DEFAULT, 4) == sample_problem(raw_key, DEFAULT, 4)
    assert sample_problem(7, DEFAULT, 4) == sample_problem(np.random.default_rng(7), DEFAULT, 4)
    assert sample_problem(7, DEFAULT, 4) != sample_problem(8, DEFAULT, 4)
    with pytest.raises(ArgumentError, match="rng"):
        sample_problem("seed", DEFAULT, 1)


@pytest.mark.parametrize("fields, message", [
    ({"right_prob": 1.0}, "right_prob"), ({"num_wrong": 0}, "num_wrong"),
    ({"num_symbols": 1}, "num_symbols"), ({"stretch_length": 0}, "stretch_length"),
    ({"max_decisions": 2.0}, "max_decisions"),
])
def test_bad_configs_are_rejected(fields, message):
    with pytest.raises(ConfigError, match=message):
        DecisionTaskConfig(**fields)


def test_bad_problems_are_rejected():
    with pytest.raises(ArgumentError, match="num_decisions"):
        sample_problem(0, DEFAULT, 5)
    with pytest.raises(ArgumentError, match="item value"):
        DecisionProblem(DEFAULT, (256,))


@pytest.mark.parametrize("count, message", [
    (0, "got 0"), (-1, "got -1"), (2.0, "got 2.0"), (True, "got True"),
])
@pytest.mark.parametrize("name", ["batch_size", "num_samples"])
def test_bad_counts_are_rejected(name, count, message):
    call = (lambda n: sample_batch(0, DEFAULT, n)) if name == "batch_size" else (
        lambda n: sample_traces(0, DecisionProblem(DEFAULT, (1, 2)), n))
    with pytest.raises(ArgumentError, match=re.escape(f"{name} must be an integer in [1, inf], {message}")):
        call(count)
    assert len(call(np.int64(2))) == 2


def _prompt_edits():
    """(name, edit of a valid 2-item prompt, reason) for each way a prompt can be malformed."""
    L, n = DEFAULT.stretch_length, DEFAULT.item_length
    second, third = 1 + n, 1 + 2 * n  # where slots 1 and 2 open

    def put(position, token):
        def edit(p):
            p[position] = token
            return p
        return edit

    return [
        ("truncated", lambda p: p[:-1], "length 41, not 42"),
        ("no <bos>", put(0, PAD), "must start with <bos>"),
        ("no <go>", put(-1, EOS), "must start with <bos> and end with <go>"),
        ("gap before the items", lambda p: np.concatenate(  # items shifted one slot on
            [p[:1], np.full(n, NONE), p[1 : -1 - n], p[-1:]]), "item slots must come first"),
        ("no items", lambda p: np.concatenate(
            [p[:1], np.full(len(p) - 2, NONE), p[-1:]]), "item slots must come first"),
        ("non-digit", put(second + 3, RIGHT), "an item slot must hold"),
        ("no <sep>", put(second + L + 1, NONE), "an item slot must hold"),
        ("junk after the items", put(third + 4, ITEM), "a slot after the last item"),
        ("two-dimensional", lambda p: p[None], "need a 1-D integer array"),
    ]


@pytest.mark.parametrize("edit, reason", [e[1:] for e in _prompt_edits()],
                         ids=[e[0] for e in _prompt_edits()])
def test_malformed_prompts_are_rejected_with_the_reason(edit, reason):
    prompt = DecisionProblem(DEFAULT, (180, 47)).prompt
    assert parse_prompt(DEFAULT, prompt) == DecisionProblem(DEFAULT, (180, 47))
    with pytest.raises(ArgumentError, match=re.escape(f"not a decision-task prompt ({reason}")):
        parse_prompt(DEFAULT, edit(prompt.copy()))


def test_prompt_layout_puts_every_copied_digit_at_one_offset():
    # The copy step a small RoPE model must learn: trace position s of item k (absolute
    # P + k(L+2) + s) has its prompt counterpart at 1 + k(L+2) + s, the same P − 1 back for
    # every digit of every item of every K; the slot after item k says <sep> vs <eos>.
    P, n, L = DEFAULT.prompt_length, DEFAULT.item_length, DEFAULT.stretch_length
    assert P == 2 + DEFAULT.max_decisions * n == 42
    problem = DecisionProblem(DEFAULT, (180, 47))
    digit_ids = DecisionVocabulary(DEFAULT).digit_ids
    expected = [BOS] + [ITEM, *digit_ids[[1, 0, 1, 1, 0, 1, 0, 0]], SEP] + [
        ITEM, *digit_ids[[0, 0, 1, 0, 1, 1, 1, 1]], SEP] + [NONE] * 2 * n + [GO]
    np.testing.assert_array_equal(problem.prompt, expected)
    for k in range(1, DEFAULT.max_decisions + 1):
        problem = sample_problem(k, DEFAULT, k)
        assert len(problem.prompt) == P
        sequence = np.concatenate([problem.prompt, problem.correct_trace])
        trace_positions = P + np.arange(k * n)
        slot = (trace_positions - P) % n
        is_digit = (slot >= 1) & (slot <= L)
        assert np.sum(is_digit) == k * L
        np.testing.assert_array_equal(sequence[trace_positions[is_digit]],
                                      sequence[trace_positions[is_digit] - (P - 1)])
        separators = trace_positions[slot == L + 1]
        next_slot_opens = sequence[separators - (P - 1) + 1]
        np.testing.assert_array_equal(sequence[separators] == SEP, next_slot_opens == ITEM)
        assert sequence[separators[-1]] == EOS


def test_tokenizer_files_load_with_tokenizers_and_transformers(tmp_path):
    write_tokenizer(tmp_path, SECOND)
    problem = sample_problem(1, SECOND, 2)
    ids = np.concatenate([problem.prompt, problem.correct_trace]).tolist()
    text = " ".join(DecisionVocabulary(SECOND).tokens()[i] for i in ids)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.encode(text).ids == ids
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, EOS, PAD)
    assert len(hf) == DecisionVocabulary(SECOND).size
    assert hf.decode(ids) == text
    assert read_task_config(tmp_path) == SECOND
    wrapped = Tokenizer.from_directory(tmp_path)  # the loader every checkpoint goes through
    assert wrapped.encode(text) == ids and wrapped.eos_token_ids == (EOS,)


def test_task_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="decision_task.json"):
        read_task_config(tmp_path)
    # A checkpoint of the old chunk-encoded layout is refused, not misread.
    (tmp_path / "decision_task.json").write_text(json.dumps({"right_prob": 0.3, "chunk_length": 4}))
    with pytest.raises(ConfigError, match="chunk_length"):
        read_task_config(tmp_path)
