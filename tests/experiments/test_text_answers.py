"""On the text tasks, `power` and `smc` records hold what the model wrote: each final answer's
text as its grader read it, the grade, and for SMC the particle's weight. A tiny random chat
model runs arithmetic with the grader swapped for one that reads only the text's length, so
every recorded grade can be checked against the recorded text."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import report  # noqa: E402
import run  # noqa: E402

from jaxsample import tasks  # noqa: E402


def _graded_by_length(problem, text):
    return len(text) % 2 == 0


def _records(out):
    lines = (out / "results.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["method"] != "exact"]


@pytest.fixture(autouse=True)
def grade_by_length(monkeypatch):
    monkeypatch.setattr(tasks, "grade_arithmetic", _graded_by_length)


def _check_grades(answers):
    assert answers and all(set(a) >= {"text", "passed"} for a in answers)
    assert [a["passed"] for a in answers] == [len(a["text"]) % 2 == 0 for a in answers]


def test_power_records_each_chains_final_answer(tmp_path, tiny_chat_checkpoint):
    out = tmp_path / "power"
    assert run.main(["power", "--task", "arithmetic", "--model", str(tiny_chat_checkpoint), "--num-problems", "3",
                     "--chains", "4", "--mcmc-steps", "2", "--max-new-tokens", "6", "--methods", "base,mh_uniform",
                     "--out", str(out)]) == 0
    records = _records(out)
    assert sorted(r["method"] for r in records) == ["base"] * 3 + ["mh_uniform"] * 3
    passed = []
    for record in records:
        _check_grades(record["answers"])
        assert len(record["answers"]) == 4
        assert record["accuracy"] == pytest.approx(np.mean([a["passed"] for a in record["answers"]]))
        passed += [a["passed"] for a in record["answers"]]
    assert 0 < np.mean(passed) < 1  # both grades occur, so the checks above can fail

    summary = (out / "summary.md").read_text()
    for method, label in (("base", "base (τ=1)"), ("mh_uniform", "MH, uniform cuts")):
        written = [a for r in records if r["method"] == method for a in r["answers"]]
        section = summary.split(f"### {label}: ")[1].split("###")[0]
        assert section.startswith(f"{sum(a['passed'] for a in written)} of {len(written)} answers pass")
        for verdict, ok in (("passes", True), ("fails", False)):
            first = next((r["problem"], a["text"]) for r in records if r["method"] == method
                         for a in r["answers"] if a["passed"] == ok)
            assert f"{first[0]}, {verdict}:\n\n```\n{first[1]}\n```" in section


def test_smc_records_each_runs_particles_with_their_weights(tmp_path, tiny_chat_checkpoint):
    out = tmp_path / "smc"
    assert run.main(["smc", "--task", "arithmetic", "--model", str(tiny_chat_checkpoint), "--num-problems", "2",
                     "--particles", "3", "--runs", "2", "--block-size", "3", "--max-new-tokens", "6",
                     "--methods", "power_smc", "--out", str(out)]) == 0
    records = _records(out)
    assert len(records) == 2
    for record in records:
        answers = record["answers"]
        _check_grades(answers)
        assert [a["run"] for a in answers] == [0, 0, 0, 1, 1, 1]
        per_run = [[a for a in answers if a["run"] == run_index] for run_index in (0, 1)]
        for particles in per_run:
            assert sum(a["weight"] for a in particles) == pytest.approx(1.0, abs=1e-5)
        expected = np.mean([sum(a["weight"] * a["passed"] for a in particles) for particles in per_run])
        assert record["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_summary_fences_each_answer_beyond_its_backticks_and_clips_long_ones():
    records = [{"problem": "p0", "method": "base", "answers": [
        {"text": "def f():\n    ```` inside", "passed": True},
        {"text": "x" * (report.EXAMPLE_CHARS + 5), "passed": False}]}]
    text = report._examples(records, ["base"], [4.0])
    assert "1 of 2 answers pass" in text
    assert "`````\ndef f():\n    ```` inside\n`````" in text
    assert "x" * report.EXAMPLE_CHARS + "\n… (5 more characters)\n```" in text
    assert report._examples([{"problem": "p0", "method": "base", "answers": []}], ["base"], [4.0]) == ""


def test_summary_of_an_alpha_sweep_counts_each_alphas_answers_apart():
    def record(method, alpha, passed):
        return {"problem": "p0", "method": method, "alpha": alpha,
                "answers": [{"text": f"{method} {alpha} {i}", "passed": ok} for i, ok in enumerate(passed)]}

    records = [record("base", None, [True, False]), record("mh_uniform", 2.0, [False, False]),
               record("mh_uniform", 4.0, [True, True])]
    headings = [line for line in report._examples(records, ["base", "mh_uniform"], [2.0, 4.0]).splitlines()
                if line.startswith("###")]
    assert headings == ["### base (τ=1): 1 of 2 answers pass", "### MH, uniform cuts, α = 2: 0 of 2 answers pass",
                        "### MH, uniform cuts, α = 4: 2 of 2 answers pass"]


def test_summary_counts_smc_runs_whose_every_weight_hit_zero(tmp_path):
    from run_directory import RunDirectory

    run_dir = RunDirectory(tmp_path / "out", {"alpha": 4.0, "model": "toy"}, resume=False)
    for method, all_zero_runs in (("base", None), ("reward_smc", 2)):
        record = {"key": method, "method": method, "group": "g", "problem": "p0", "accuracy": 0.25,
                  "tokens": 10.0, "acceptance": None, "curve": [[10.0, 0.25]], "answers": []}
        if all_zero_runs is not None:
            record["all_zero_runs"] = all_zero_runs
        run_dir.append(record)
    table = report.summarize(run_dir, ["base", "reward_smc"], "t").splitlines()
    assert table[0].endswith("| all-zero runs |")
    assert table[2].endswith("|  |") and table[3].endswith("| 2 |")
