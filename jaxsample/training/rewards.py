"""Verifiable rewards for GRPO from the task graders (`jaxsample.tasks`), computed on the host.

Every reward function has the signature `reward_fn(problems, tokens [S, N], lengths [S]) ->
rewards float [B, G]` that `grpo_step_fn` expects: `problems` is the list of B problems of the
step and rows `b·G .. b·G + G − 1` of `tokens` are the G completions of problem b.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from jaxsample import tasks
from jaxsample.errors import ArgumentError


def group_size(problems: Sequence, tokens: np.ndarray) -> int:
    """G, the completions per problem, checking that the S rows split into B groups."""
    rows = np.shape(tokens)[0]
    if not problems or rows % len(problems):
        raise ArgumentError(f"{rows} completions do not split into groups for {len(problems)} problems")
    return rows // len(problems)


def grade_groups(grade: Callable[[Any, np.ndarray], float], problems: Sequence, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rewards `[B, G]` from `grade(problem, completion_tokens [length]) -> float`."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    size = group_size(problems, tokens)
    rewards = [float(grade(problems[row // size], tokens[row, : lengths[row]])) for row in range(tokens.shape[0])]
    return np.asarray(rewards, np.float32).reshape(len(problems), size)


def completion_text(tokenizer: Any, tokens: np.ndarray, stop_ids: Sequence[int]) -> str:
    """The decoded text of one completion, stop tokens removed.

    Args:
      tokenizer: anything with `decode(ids) -> str` (e.g. `jaxsample.models.Tokenizer`).
      tokens: int `[n]` the completion's generated tokens (cut at its length, pad excluded).
      stop_ids: the model's stop tokens (`LanguageModel.eos_token_ids`); every occurrence is
        dropped before decoding, not only the final one.

    Returns:
      The decoded string.
    """
    return tokenizer.decode([int(t) for t in tokens if int(t) not in stop_ids])


def arithmetic_reward(tokenizer: Any, stop_ids: Sequence[int]) -> Callable:
    """1 when `tasks.grade_arithmetic` accepts the reply (problems: `ArithmeticProblem`s)."""

    def reward_fn(problems, tokens, lengths):
        return grade_groups(lambda p, c: tasks.grade_arithmetic(p, completion_text(tokenizer, c, stop_ids)), problems, tokens, lengths)

    return reward_fn


def decision_reward(problems, tokens, lengths) -> np.ndarray:
    """1 when `tasks.grade` accepts the decision-task trace (problems: `DecisionProblem`s)."""
    return grade_groups(lambda p, c: tasks.grade(p, c), problems, tokens, lengths)


def humaneval_reward(tokenizer: Any, stop_ids: Sequence[int], limits: tasks.SandboxLimits | None = None, workers: int | None = None) -> Callable:
    """1 when the reply's code passes the problem's tests (`tasks.check_humaneval_batch`: the
    candidate runs sandboxed, the tests in a separate judge, `workers` runs at a time)."""
    limits = tasks.SandboxLimits() if limits is None else limits

    def reward_fn(problems, tokens, lengths):
        size = group_size(problems, tokens)
        completions = [
            tasks.extract_code(completion_text(tokenizer, row[:length], stop_ids)) for row, length in zip(np.asarray(tokens), np.asarray(lengths))
        ]
        results = tasks.check_humaneval_batch([problems[row // size] for row in range(len(completions))], completions, limits, workers)
        return np.asarray([r.passed for r in results], np.float32).reshape(len(problems), size)

    return reward_fn
