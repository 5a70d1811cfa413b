"""Task rewards for GRPO: grouping, the sorting grader, the sandboxed HumanEval grader."""

import numpy as np
import pytest

from jaxsample import tasks
from jaxsample.errors import ArgumentError
from jaxsample.tasks import sorting
from jaxsample.training.rewards import completion_text, grade_groups, humaneval_reward

STOP = 0


class CharTokenizer:
    """Token id = Unicode code point (0 is the stop token)."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def encode(text, width):
    ids = [ord(c) for c in text] + [STOP]
    return ids + [STOP] * (width - len(ids)), len(ids)


def test_sorting_rewards_are_grouped_per_problem():
    problems = [sorting.SortingProblem((3, 1, 2)), sorting.SortingProblem((0, 0, 9))]
    completions = [[1, 2, 3, sorting.EOS], [1, 3, 2, sorting.EOS], [0, 0, 9, sorting.EOS], [0, 0, 9, 9]]
    rewards = grade_groups(sorting.grade_sorting, problems, np.asarray(completions), np.asarray([4, 4, 4, 3]))
    np.testing.assert_array_equal(rewards, [[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ArgumentError, match="groups"):
        grade_groups(sorting.grade_sorting, problems, np.zeros((3, 4), int), np.ones(3, int))
    # Only the first `length` tokens are graded: the row [1, 2, 3, EOS] of length 3 never
    # generated its stop token (the EOS is in a slot past its length), so it is wrong.
    rewards = grade_groups(sorting.grade_sorting, problems[:1], np.asarray(completions[:1] * 2), np.asarray([3, 4]))
    np.testing.assert_array_equal(rewards, [[0.0, 1.0]])


def test_completion_text_drops_the_stop_tokens():
    assert completion_text(CharTokenizer(), [ord("4"), ord("2"), STOP], (STOP,)) == "42"
    assert completion_text(CharTokenizer(), [ord("4"), 7, ord("2"), STOP], (STOP, 7)) == "42"


def test_humaneval_reward_runs_the_tests_in_the_sandbox():
    problem = tasks.load_humaneval()[0]
    right = f"```python\n{problem.prompt}{problem.canonical_solution}```"
    wrong = f"```python\n{problem.prompt}    return True\n```"
    rows = [encode(text, 2000) for text in (right, wrong)]
    reward_fn = humaneval_reward(CharTokenizer(), (STOP,), workers=2)
    rewards = reward_fn([problem], np.asarray([r[0] for r in rows]), np.asarray([r[1] for r in rows]))
    np.testing.assert_array_equal(rewards, [[1.0, 0.0]])
