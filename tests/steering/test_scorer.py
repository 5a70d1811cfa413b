"""Bag-of-words attribute scorer: held-out accuracy on the shipped sentiment sentences, the
optimum against scikit-learn, determinism, and errors on bad input."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.steering import BagOfWordsScorer, fit_bag_of_words, words

DATA = Path(__file__).resolve().parents[2] / "experiments" / "data"


def _labelled(name):
    rows = [line.split("\t") for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [text for _, text in rows], np.asarray([int(label) for label, _ in rows])


@pytest.fixture(scope="module")
def fitted():
    texts, labels = _labelled("sentiment_train.tsv")
    return fit_bag_of_words(texts, labels), texts, labels


def test_held_out_accuracy_is_far_above_chance(fitted):
    scorer, _, _ = fitted
    texts, labels = _labelled("sentiment_test.tsv")
    accuracy = np.mean((scorer.probability(texts) > 0.5) == labels)
    # Balanced held-out set: chance is 1/2 with standard error sqrt(1/4n); require 4 of them
    # above chance (p < 4e-5 for a scorer no better than a coin).
    assert accuracy > 0.5 + 4 * np.sqrt(0.25 / len(labels))


def test_fit_is_the_penalised_logistic_regression_optimum(fitted):
    scorer, texts, labels = fitted
    reference = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(scorer.features(texts), labels)
    np.testing.assert_allclose(scorer.weights, reference.coef_[0], atol=1e-5)
    np.testing.assert_allclose(scorer.bias, reference.intercept_[0], atol=1e-5)


def test_fit_is_deterministic_and_scores_by_known_words(fitted):
    scorer, texts, labels = fitted
    again = fit_bag_of_words(texts, labels)
    assert again.vocabulary == scorer.vocabulary
    np.testing.assert_array_equal(again.weights, scorer.weights)
    # unknown words and empty texts carry no evidence: the prior log-odds
    p = scorer.probability(["", "Zyxx qwvb!", "wonderful", "WONDERFUL zyxx"])
    np.testing.assert_allclose(p[:2], 1 / (1 + np.exp(-scorer.bias)))
    assert p[2] == p[3] > 0.5
    assert words("I don't LIKE it, 2 times.") == ["i", "don't", "like", "it", "times"]


def test_bad_input_raises_clear_errors(fitted):
    scorer, _, _ = fitted
    with pytest.raises(ArgumentError, match="at least one text"):
        scorer.probability([])
    with pytest.raises(ArgumentError, match="single string"):
        scorer.probability("a sentence")
    with pytest.raises(ArgumentError, match="text 1 is a int"):
        scorer.probability(["fine", 3])
    with pytest.raises(ArgumentError, match="both classes"):
        fit_bag_of_words(["good", "great"], [1, 1])
    with pytest.raises(ArgumentError, match="0 or 1"):
        fit_bag_of_words(["good", "bad"], [1, 2])
    with pytest.raises(ArgumentError, match=r"shape \[N=2\]"):
        fit_bag_of_words(["good", "bad"], [1, 0, 1])
    with pytest.raises(ArgumentError, match="has none"):
        fit_bag_of_words(["good", "..."], [1, 0])
    for l2 in (0.0, float("inf")):
        with pytest.raises(ArgumentError, match=r"l2 must be a number in \(0, inf\)"):
            fit_bag_of_words(["good", "bad"], [1, 0], l2=l2)
    for tolerance in (0.0, float("nan")):
        with pytest.raises(ArgumentError, match=r"tolerance must be a number in \(0, inf\)"):
            fit_bag_of_words(["good", "bad"], [1, 0], tolerance=tolerance)
    with pytest.raises(ArgumentError, match=r"max_steps must be an integer in \[1, inf\], got 0"):
        fit_bag_of_words(["good", "bad"], [1, 0], max_steps=0)
    with pytest.raises(NumericalError, match="did not converge"):
        fit_bag_of_words(["good", "bad"], [1, 0], max_steps=1)
    assert isinstance(scorer, BagOfWordsScorer)
