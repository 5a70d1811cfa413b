"""MATH500 loading from user files, boxed-answer extraction and math_verify grading."""

import json

import pytest

from jaxsample.errors import DataError
from jaxsample.tasks import (
    MathProblem,
    extract_boxed,
    grade_math,
    load_math500,
    math_messages,
    math_prompt,
)

RECORDS = [
    {"problem": "Compute $\\frac{3}{6}$.", "answer": "\\frac{1}{2}",
     "solution": "... \\boxed{\\frac12}", "level": 1, "subject": "Prealgebra",
     "unique_id": "test/prealgebra/1.json"},
    {"problem": "Convert $(0,3)$ to polar coordinates.",
     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "unique_id": "test/precalculus/807.json"},
    {"problem": "What is $6 \\cdot 7$?", "answer": 42},
]


def test_jsonl_and_json_array_load_the_same_problems(tmp_path):
    jsonl = tmp_path / "math.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    array = tmp_path / "math.json"
    array.write_text(json.dumps(RECORDS, indent=2))
    problems = load_math500(jsonl)
    assert problems == load_math500(array)
    assert problems[0] == MathProblem(**RECORDS[0])
    assert problems[2].answer == "42" and problems[2].level is None


@pytest.mark.parametrize("content, message", [
    ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"\n', "line 2: malformed JSON"),
    ('{"problem": "a", "answer": "1"}\n\n{"problem": "b"}\n', "line 3: missing field 'answer'"),
    ('[\n  {"problem": "a", "answer": "1"},\n  {"problem": "", "answer": "2"}\n]',
     "line 3: field 'problem'"),
    ('[\n  {"problem": "a", "answer": "1"}\n  {"problem": "b", "answer": "2"}\n]',
     "line 3: expected ','"),
    ('["just a string"]', "line 1: expected a JSON object"),
    ('{"problem": "a", "answer": "1", "level": [1]}', "field 'level' has the wrong type"),
    ('{"problem": "a", "answer": "1", "unique_id": "u"}\n'
     '{"problem": "b", "answer": "2", "unique_id": "u"}',
     "line 2: unique_id 'u' repeats line 1"),
    ("", "no records"),
])
def test_malformed_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="bad.jsonl") as error:
        load_math500(path)
    assert message in str(error.value)


def test_a_missing_file_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(DataError, match="not downloaded"):
        load_math500(tmp_path / "MATH500.jsonl")


@pytest.mark.parametrize("text, boxed", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} at first, but \\boxed{\\sqrt{a^{2}+b^{2}}}", "\\sqrt{a^{2}+b^{2}}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5.", "5"),
    ("\\boxed{unclosed", None),
    ("no box", None),
])
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


@pytest.mark.parametrize("reference, response, correct", [
    ("\\frac{1}{2}", "Dividing, we get $\\boxed{0.5}$.", True),
    ("\\frac{1}{2}", "The answer is \\boxed{\\dfrac12}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", True),
    ("42", "\\boxed{43}", False),
    ("\\frac{1}{2}", "I cannot solve this.", False),
])
def test_grade_math(reference, response, correct):
    assert grade_math(reference, response) is correct


def test_chat_prompt_has_instruction_and_problem():
    problem = MathProblem("What is $1+1$?", "2")
    messages = math_messages(problem)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "\\boxed" in messages[0]["content"]
    assert math_messages(problem, system=None) == [{"role": "user", "content": "What is $1+1$?"}]

    class Tokenizer:
        def apply_chat_template(self, messages):
            return [ord(m["content"][0]) for m in messages]

    assert math_prompt(Tokenizer(), problem) == [ord("S"), ord("W")]
