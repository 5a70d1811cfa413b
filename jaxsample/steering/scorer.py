"""A bag-of-words logistic-regression attribute scorer, to measure what steering changes.

P(attribute | text) = σ(b + Σ_w θ_w [w ∈ text]) over a vocabulary of lower-cased words,
fitted to labelled sentences by Newton's method on the L2-penalised log-loss
Σ_i −log p(y_i | x_i) + (l2/2)‖θ‖² (bias not penalised). Small and transparent: a
stand-in for the paper's neural classifiers (the toxicity experiment reads a RoBERTa
classifier), trained on sentences shipped with the experiment.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.validation import check_int, check_scalar

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (letters, with an inner apostrophe: "don't")."""
    return _WORD.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class BagOfWordsScorer:
    """A fitted scorer over V words.

    Attributes:
      vocabulary: the V words, sorted (feature j is word `vocabulary[j]`).
      weights: float64 `[V]` per-word log-odds θ.
      bias: the log-odds b of a text without known words.
    """

    vocabulary: tuple[str, ...]
    weights: np.ndarray
    bias: float

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """Word-presence features: N texts → float64 `[N, V]` (1 where the word occurs)."""
        texts = _check_texts(texts)
        index = {word: j for j, word in enumerate(self.vocabulary)}
        x = np.zeros((len(texts), len(self.vocabulary)))
        for i, text in enumerate(texts):
            for word in words(text):
                if word in index:
                    x[i, index[word]] = 1.0
        return x

    def probability(self, texts: Sequence[str]) -> np.ndarray:
        """P(attribute) of each text: N texts → float64 `[N]`. A text without known words
        (also an empty one, e.g. a continuation that stopped at once) gets σ(b)."""
        return _sigmoid(self.bias + self.features(texts) @ self.weights)


def fit_bag_of_words(
    texts: Sequence[str], labels: Sequence[int], l2: float = 1.0, max_steps: int = 50, tolerance: float = 1e-9
) -> BagOfWordsScorer:
    """Fits the scorer to labelled texts (deterministic: no randomness anywhere).

    Args:
      texts: N training texts, each with at least one word.
      labels: N labels in {0, 1} (1: the attribute), both classes present.
      l2: the L2 penalty (> 0) on the word weights.
      max_steps: Newton steps allowed to reach `tolerance`.
      tolerance: largest gradient entry accepted at the optimum.

    Returns:
      the fitted `BagOfWordsScorer`, its vocabulary every word of `texts`.

    Raises:
      ArgumentError: empty or mismatched input, a text without words, labels outside {0, 1},
        one class only, l2 or tolerance not a finite number > 0, max_steps < 1.
      NumericalError: Newton's method did not converge within `max_steps`.
    """
    texts = _check_texts(texts)
    max_steps = check_int("max_steps", max_steps, 1)
    labels = np.asarray(labels)
    if labels.shape != (len(texts),):
        raise ArgumentError(f"labels must have shape [N={len(texts)}] (one per text), got {labels.shape}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ArgumentError(f"labels must be 0 or 1, got values {sorted(set(labels.tolist()))}")
    if labels.min() == labels.max():
        raise ArgumentError(f"labels must contain both classes 0 and 1, got only {int(labels[0])}")
    check_scalar("l2", l2, "(0, inf)")
    check_scalar("tolerance", tolerance, "(0, inf)")
    empty = [i for i, text in enumerate(texts) if not words(text)]
    if empty:
        raise ArgumentError(f"training texts must contain words; text {empty[0]} ({texts[empty[0]]!r}) has none")
    vocabulary = tuple(sorted({word for text in texts for word in words(text)}))
    x = BagOfWordsScorer(vocabulary, np.zeros(len(vocabulary)), 0.0).features(texts)
    x = np.concatenate([np.ones((len(texts), 1)), x], axis=1)  # column 0: the bias
    y = labels.astype(np.float64)
    penalty = np.full(x.shape[1], l2)
    penalty[0] = 0.0
    theta = np.zeros(x.shape[1])
    for _ in range(max_steps):
        p = _sigmoid(x @ theta)
        gradient = x.T @ (p - y) + penalty * theta
        if np.max(np.abs(gradient)) < tolerance:
            return BagOfWordsScorer(vocabulary, theta[1:], float(theta[0]))
        hessian = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        theta = theta - np.linalg.solve(hessian, gradient)
    raise NumericalError(
        f"the bag-of-words fit did not converge in max_steps={max_steps} Newton steps "
        f"(largest gradient entry {np.max(np.abs(gradient)):.3g} > tolerance {tolerance})"
    )


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ArgumentError("texts must be a sequence of strings, got a single string")
    texts = list(texts)
    if not texts:
        raise ArgumentError("texts must hold at least one text, got none")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ArgumentError(f"texts must be strings; text {i} is a {type(text).__name__} ({text!r})")
    return texts


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))
