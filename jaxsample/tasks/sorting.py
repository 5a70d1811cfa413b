"""A synthetic sparse-reward task for RL from scratch: sort a list of digits.

Vocabulary (V = 14): digits 0–9 are ids 0–9, then `<bos>` 10, `<sep>` 11, `<eos>` 12,
`<pad>` 13. A prompt is `<bos> d_1 … d_n <sep>`; the answer is the n digits in ascending
order followed by `<eos>`. The reward is 1 only for the exact answer (training.md §2.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxsample.errors import ArgumentError
from jaxsample.tasks.rng import numpy_rng
from jaxsample.validation import check_int, is_int

BOS, SEP, EOS, PAD = 10, 11, 12, 13
VOCAB_SIZE = 14


@dataclass(frozen=True)
class SortingProblem:
    """One list to sort.

    Attributes:
      digits: the unsorted digits, each in 0–9 (they are their own token ids).
    """

    digits: tuple[int, ...]

    @property
    def prompt(self) -> list[int]:
        """The prompt token ids: `<bos>`, the digits, `<sep>`."""
        return [BOS, *self.digits, SEP]

    @property
    def answer(self) -> list[int]:
        """The target completion: sorted digits, then `<eos>`."""
        return [*sorted(self.digits), EOS]


def sample_sorting(rng, num_problems: int, length: int | tuple[int, int] = 6) -> list[SortingProblem]:
    """Problems with uniform digits.

    Args:
      rng: `np.random.Generator`, int seed or JAX key.
      num_problems: how many.
      length: digits per list, or an inclusive range `(low, high)` drawn uniformly per problem.
    """
    num_problems = check_int("num_problems", num_problems, 1)
    bounds = (length, length) if is_int(length) else tuple(length) if isinstance(length, (tuple, list)) else ()
    if not (len(bounds) == 2 and all(is_int(n) for n in bounds) and 1 <= bounds[0] <= bounds[1]):
        raise ArgumentError(f"length must be an int >= 1 or a range (low, high) of ints with 1 <= low <= high, got {length!r}")
    low, high = (int(n) for n in bounds)
    rng = numpy_rng(rng)
    sizes = rng.integers(low, high + 1, size=num_problems)
    return [SortingProblem(tuple(int(d) for d in rng.integers(0, 10, size=n))) for n in sizes]


def grade_sorting(problem: SortingProblem, completion) -> bool:
    """Whether `completion` (generated ids, stop token included, no padding) is the answer."""
    return [int(t) for t in np.asarray(completion).ravel()] == problem.answer
