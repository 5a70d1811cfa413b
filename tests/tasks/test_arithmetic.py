"""Arithmetic problems, chat prompts and answer extraction."""

import numpy as np
import pytest

from jaxsample.errors import ArgumentError
from jaxsample.tasks import (
    ArithmeticProblem,
    arithmetic_messages,
    arithmetic_prompt,
    extract_integer,
    grade_arithmetic,
    sample_arithmetic,
)


class RecordingTokenizer:
    """The tokenizer contract the prompt builders rely on: apply_chat_template(messages) -> ids."""

    def __init__(self):
        self.messages = None

    def apply_chat_template(self, messages):
        self.messages = messages
        return [len(m["content"]) for m in messages]


@pytest.mark.parametrize("num_digits", [2, 3])
@pytest.mark.parametrize("operation", ["+", "*"])
def test_problems_are_seeded_and_in_range(num_digits, operation):
    problems = sample_arithmetic(0, 200, num_digits, operation)
    assert problems == sample_arithmetic(np.random.default_rng(0), 200, num_digits, operation)
    assert problems != sample_arithmetic(1, 200, num_digits, operation)
    operands = np.array([(p.a, p.b) for p in problems])
    assert operands.min() >= 10 ** (num_digits - 1) and operands.max() < 10**num_digits
    assert len(set(map(tuple, operands))) > 150  # not stuck on a few values
    for p in problems:
        assert p.answer == (p.a + p.b if operation == "+" else p.a * p.b)


def test_chat_prompt_goes_through_the_tokenizer_template():
    problem = ArithmeticProblem(37, 58, "*")
    tokenizer = RecordingTokenizer()
    ids = arithmetic_prompt(tokenizer, problem)
    assert tokenizer.messages == arithmetic_messages(problem)
    user = tokenizer.messages[-1]
    assert user["role"] == "user" and "What is 37 * 58?" in user["content"]
    assert ids == [len(tokenizer.messages[0]["content"])]
    with_system = arithmetic_messages(problem, system="Be brief.")
    assert [m["role"] for m in with_system] == ["system", "user"]


@pytest.mark.parametrize("text, value", [
    ("37 * 58 = 2146", 2146),
    ("The answer is **2,146**.", 2146),
    ("So the result is 2146.0", 2146),
    ("First 30 * 58 = 1740, then 7 * 58 = 406, total 2146", 2146),
    ("Final answer: \\boxed{2,146}. (Check: 2146 / 58 = 37)", 2146),
    ("x = -12", -12),
    ("12-5", 5),
    ("3.5", None),
    ("no digits here", None),
    ("1,234,567", 1234567),
    # LaTeX thousands separators used to leave only the last group: 234, 234, 0
    ("So the total is \\boxed{1{,}234}.", 1234),
    ("\\boxed{1\\,234}", 1234),
    ("\\boxed{-1{,}000}", -1000),
    ("\\boxed{1\\!234~567}", 1234567),
    ("total 12\u2009345", 12345),
    ("\\boxed{1{,}23}", None),
    # a box with several numbers or a fraction used to give its last number
    ("\\boxed{\\dfrac{6}{2}}", None),
    ("\\boxed{\\frac6{2}}", None),
    ("\\boxed{45 + 67 = 112}", None),
    ("\\boxed{12}\\text{ apples}", 12),
    ("\\boxed {42}", 42),
])
def test_extract_integer(text, value):
    assert extract_integer(text) == value


def test_grading_is_exact():
    problem = ArithmeticProblem(45, 67, "+")
    assert grade_arithmetic(problem, "45 + 67 = **112**")
    assert not grade_arithmetic(problem, "45 + 67 = 113")
    assert not grade_arithmetic(problem, "I am not sure.")


def test_bad_arguments_are_rejected():
    with pytest.raises(ArgumentError, match="num_digits"):
        sample_arithmetic(0, 1, num_digits=4)
    with pytest.raises(ArgumentError, match="operation"):
        sample_arithmetic(0, 1, operation="-")
    with pytest.raises(ArgumentError, match="operation"):
        ArithmeticProblem(1, 2, "/")
