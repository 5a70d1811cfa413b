"""MATH500 (or any MATH-style set) from a file the user supplies, graded with math_verify.

Nothing is downloaded: `load_math500(path)` reads a JSON array of records or JSON Lines,
each with `problem` and `answer` and optionally `solution`, `level`, `subject`,
`unique_id` (the fields of HuggingFaceH4/MATH-500). Malformed input raises `DataError`
naming the file, line and field.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from jaxsample.errors import DataError

_BOXES = ("\\boxed", "\\fbox")
SYSTEM_PROMPT = "Solve the problem step by step. Put the final answer in \\boxed{}."


@dataclass(frozen=True)
class MathProblem:
    """One MATH-style problem (the fields of HuggingFaceH4/MATH-500; the optional ones are
    carried along, never graded).

    Attributes:
      problem: the problem statement (LaTeX), the user message of `math_messages`.
      answer: the reference final answer (LaTeX) that `grade_math` compares against.
      solution: the worked reference solution (LaTeX), or None.
      level: difficulty as given (MATH's 1–5, or a label such as "Level 3"), or None.
      subject: the MATH subject, e.g. "Algebra", or None.
      unique_id: the record's id (e.g. "test/algebra/1.json"), unique within a file, or None.
    """

    problem: str
    answer: str
    solution: str | None = None
    level: int | str | None = None
    subject: str | None = None
    unique_id: str | None = None


def load_math500(path: str | Path) -> list[MathProblem]:
    """Problems from a JSON array or a JSON Lines file (format detected from the content)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{path}: no such file (MATH500 is not downloaded; pass the path of a local copy)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    records = _json_array(path, text) if text.lstrip().startswith("[") else _json_lines(path, text)
    problems = [_problem(path, line, record) for line, record in records]
    if not problems:
        raise DataError(f"{path}: no records")
    seen: dict[str, int] = {}
    for (line, _), problem in zip(records, problems):
        if problem.unique_id is not None:
            if problem.unique_id in seen:
                raise DataError(f"{path}, line {line}: unique_id {problem.unique_id!r} repeats "
                                f"line {seen[problem.unique_id]}")
            seen[problem.unique_id] = line
    return problems


def _json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {number}: malformed JSON ({e.msg}, column {e.colno})") from None
    return records


def _json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Records of a JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    records = []

    def skip(position):
        while position < len(text) and text[position].isspace():
            position += 1
        return position

    def fail(position, message):
        line = text.count("\n", 0, position) + 1
        raise DataError(f"{path}, line {line}: {message}")

    position = skip(position)
    if position < len(text) and text[position] == "]":
        return records
    while True:
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        records.append((text.count("\n", 0, position) + 1, record))
        position = skip(end)
        if position < len(text) and text[position] == ",":
            position = skip(position + 1)
        elif position < len(text) and text[position] == "]":
            if text[skip(position + 1):]:
                fail(skip(position + 1), "unexpected content after the JSON array")
            return records
        else:
            fail(position, "expected ',' or ']' after a record")


def _problem(path: Path, line: int, record: Any) -> MathProblem:
    where = f"{path}, line {line}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("problem", "answer"):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r}")
    if not isinstance(record["problem"], str) or not record["problem"].strip():
        raise DataError(f"{where}: field 'problem' must be a non-empty string")
    answer = record["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(
            f"{where}: field 'answer' must be a non-empty string or a number, got {answer!r}")
    optional = (("solution", str), ("level", (int, str)), ("subject", str), ("unique_id", str))
    for field, types in optional:
        value = record.get(field)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise DataError(f"{where}: field {field!r} has the wrong type ({type(value).__name__})")
    return MathProblem(record["problem"], answer, record.get("solution"), record.get("level"),
                       record.get("subject"), record.get("unique_id"))


def extract_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included.

    Also reads the brace-less form `\\boxed 5`. None if there is none, or if its braces
    never close.
    """
    start, box = max((text.rfind(box), box) for box in _BOXES)
    if start < 0:
        return None
    rest = text[start + len(box) :]
    if rest.startswith(" "):
        words = rest.split()
        return words[0].rstrip("$.") if words else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None


def math_messages(problem: MathProblem, system: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages for a MATH problem.

    Args:
      problem: the problem; its `problem` text is the user message.
      system: the system instruction (default `SYSTEM_PROMPT`: answer in `\\boxed{}`), or
        None / "" to omit the system message.

    Returns:
      `[{"role": "system", ...}, {"role": "user", ...}]` (the system message only when
      `system` is set), for `Tokenizer.apply_chat_template`.
    """
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": problem.problem}]


def math_prompt(
    tokenizer: Any, problem: MathProblem, system: str | None = SYSTEM_PROMPT
) -> Sequence[int]:
    """Token ids of the chat prompt, via `tokenizer.apply_chat_template(messages)`."""
    return tokenizer.apply_chat_template(math_messages(problem, system))


def grade_math(reference: str, response: str, timeout_s: int = 5) -> bool:
    """Whether `response`'s final answer is mathematically equal to `reference`.

    Uses math_verify: the reference is parsed as LaTeX, the response's answer is extracted
    (its `\\boxed{}` first). math_verify's timeouts use SIGALRM, which works only in the main
    thread; elsewhere they are off and the caller bounds the time.
    """
    from math_verify import parse, verify

    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    answer = parse(response, parsing_timeout=timeout)
    if not gold or not answer:
        return False
    return bool(verify(gold, answer, timeout_seconds=timeout))
