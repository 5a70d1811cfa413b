"""The sorting task's sampler: counts and lengths."""

import numpy as np
import pytest

from jaxsample.errors import ArgumentError
from jaxsample.tasks.sorting import grade_sorting, sample_sorting


def test_sample_sorting_accepts_numpy_integers():
    problems = sample_sorting(0, np.int64(3), np.int64(4))
    assert len(problems) == 3 and all(len(p.digits) == 4 for p in problems)
    assert all(2 <= len(p.digits) <= 5 for p in sample_sorting(1, 20, (np.int64(2), 5)))
    assert grade_sorting(problems[0], problems[0].answer)


@pytest.mark.parametrize("num_problems, length, message", [
    (0, 6, "num_problems must be an integer in [1, inf], got 0"),
    (-1, 6, "num_problems must be an integer in [1, inf], got -1"),
    (2, 0, "length must be an int >= 1 or a range (low, high) of ints with 1 <= low <= high, got 0"),
    (2, (5, 3), "got (5, 3)"),
    (2, (2, 3.5), "got (2, 3.5)"),
    (2, 6.0, "got 6.0"),
    (2, (1, 2, 3), "got (1, 2, 3)"),
])
def test_sample_sorting_rejects_bad_arguments(num_problems, length, message):
    with pytest.raises(ArgumentError) as error:
        sample_sorting(0, num_problems, length)
    assert message in str(error.value)
