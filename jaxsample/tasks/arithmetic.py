"""Two- and three-digit addition and multiplication as chat prompts, graded exactly.

The prompt works with any tokenizer wrapper that has `apply_chat_template(messages) -> ids`
(e.g. `jaxsample.models.Tokenizer` of `smollm2-135m-instruct`). Answers are read from free
text: the last integer of the reply, or the one integer of its last `\\boxed{}`, tolerating
thousands separators (LaTeX's `1{,}234`, `1\\,234` too), `= 123`, `**123**` and a trailing `.0`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from jaxsample.errors import ArgumentError
from jaxsample.validation import check_int
from jaxsample.tasks.math500 import extract_boxed
from jaxsample.tasks.rng import numpy_rng

OPERATIONS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b}
# A number not glued to a preceding digit, letter or point: 1,234,567 | 1234 | -12 | 12.0
_NUMBER = re.compile(r"(?<![\w.])([-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d|,\d)")
# LaTeX thousands separators before a group of three digits: 1{,}234 reads as 1,234, and
# 1\,234, 1\!234, 1~234 and thin-spaced 1 234 as 1234 (else only the last group is read).
_BRACED_COMMA = re.compile(r"(?<=\d)\{,\}(?=\d{3}(?!\d))")
_DIGIT_GAP = re.compile(r"(?<=\d)(?:\\[,!]|~|[\u2009\u202f])(?=\d{3}(?!\d))")
_FRACTION = re.compile(r"\\\w*frac")  # \frac, \dfrac, \tfrac: \frac6{2} shows only the number 2


@dataclass(frozen=True)
class ArithmeticProblem:
    """The question "What is a op b?"; `answer` is its exact int value.

    Attributes:
      a: the left operand.
      b: the right operand.
      operation: "+" or "*" (a key of `OPERATIONS`; anything else raises `ArgumentError`).
    """

    a: int
    b: int
    operation: str

    def __post_init__(self):
        if self.operation not in OPERATIONS:
            raise ArgumentError(
                f"operation must be one of {sorted(OPERATIONS)}, got {self.operation!r}")

    @property
    def answer(self) -> int:
        """The exact result a op b."""
        return OPERATIONS[self.operation](self.a, self.b)

    @property
    def question(self) -> str:
        """The question, `What is a op b?` (the start of the user message)."""
        return f"What is {self.a} {self.operation} {self.b}?"


def sample_arithmetic(
    rng, num_problems: int, num_digits: int = 2, operation: str = "+"
) -> list[ArithmeticProblem]:
    """Problems with both operands uniform over `num_digits`-digit numbers.

    Args:
      rng: `np.random.Generator`, int seed or JAX PRNG key.
      num_problems: how many.
      num_digits: 2 or 3.
      operation: "+" or "*".
    """
    num_problems = check_int("num_problems", num_problems, 1)
    num_digits = check_int("num_digits", num_digits, 2, 3)
    if operation not in OPERATIONS:
        raise ArgumentError(f"operation must be one of {sorted(OPERATIONS)}, got {operation!r}")
    low, high = 10 ** (num_digits - 1), 10**num_digits
    operands = numpy_rng(rng).integers(low, high, size=(num_problems, 2))
    return [ArithmeticProblem(int(a), int(b), operation) for a, b in operands]


def arithmetic_messages(
    problem: ArithmeticProblem, system: str | None = None
) -> list[dict[str, str]]:
    """Chat messages asking the question (with an optional system message)."""
    content = f"{problem.question} Reply with the final answer as a number."
    user = {"role": "user", "content": content}
    return ([{"role": "system", "content": system}] if system else []) + [user]


def arithmetic_prompt(
    tokenizer: Any, problem: ArithmeticProblem, system: str | None = None
) -> Sequence[int]:
    """Token ids of the chat prompt, via `tokenizer.apply_chat_template(messages)`."""
    return tokenizer.apply_chat_template(arithmetic_messages(problem, system))


def extract_integer(text: str) -> int | None:
    """The last integer in `text`, or the one integer inside its last `\\boxed{}` if it has
    one, else None.

    A final number with a non-zero fractional part is not an integer answer: None. Nor is a
    box holding several numbers (`\\boxed{2 + 3 = 5}`) or a fraction (`\\boxed{\\dfrac{6}{2}}`):
    its last number need not be the answer.
    """
    boxed = extract_boxed(text)
    answer = _DIGIT_GAP.sub("", _BRACED_COMMA.sub(",", boxed if boxed is not None else text))
    matches = list(_NUMBER.finditer(answer))
    if not matches or boxed is not None and (len(matches) > 1 or _FRACTION.search(boxed)):
        return None
    sign, digits, fraction = matches[-1].groups()
    if fraction and int(fraction[1:]) != 0:
        return None
    return int(("-" if sign else "") + digits.replace(",", ""))


def grade_arithmetic(problem: ArithmeticProblem, text: str) -> bool:
    """Whether the reply's extracted integer equals the exact answer."""
    return extract_integer(text) == problem.answer
