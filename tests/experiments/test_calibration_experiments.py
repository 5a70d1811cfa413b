"""`run.py csa` end to end on a tiny synthetic configuration."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import run  # noqa: E402


def test_csa_command_writes_metrics_table_and_plot(tmp_path):
    out = tmp_path / "csa"
    argv = ["csa", "--scenarios", "stationary,burst", "--methods", "csa,arcps,ltt,aci_selective",
            "--streams", "2", "--rounds", "600", "--refit-every", "50", "--calibration-rounds", "200", "--out", str(out)]
    assert run.main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["key"] for r in records} == {f"{s}/{m}" for s in ("stationary", "burst") for m in ("csa", "arcps", "ltt", "aci_selective", "oracle")}
    csa = next(r for r in records if r["key"] == "stationary/csa")
    assert len(csa["violated"]) == 2 and all(0 <= x <= 1 for x in csa["release"])
    assert len(csa["risk_curve"]) == 600 // 25
    summary = (out / "summary.md").read_text()
    assert "CSA (live certificates)" in summary and "oracle cut" in summary
    assert (out / "csa.png").stat().st_size > 0
    # stopped inside the last scenario: resume saves only its two missing units, unchanged
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:-2]))
    assert run.main(["csa", "--out", str(out), "--resume"]) == 0
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == records


@pytest.mark.parametrize("model, methods", [("synthetic", "static,ttt,ttt_eta0"), ("toy-decisions", "ttt")])
def test_orca_command_reports_every_method_in_and_out_of_distribution(model, methods, tmp_path):
    out = tmp_path / "orca"
    argv = ["orca", "--model", model, "--methods", methods, "--feature-size", "4", "--train-problems", "8", "--pool-problems", "20",
            "--ood-problems", "10", "--resplits", "3", "--epochs", "1", "--window", "3", "--out", str(out)]
    assert run.main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == methods.split(",")
    for record in records:
        assert len(record["in_error"]) == 3 and all(0 <= s <= 1 for s in record["ood_savings"])
    assert "ORCA TTT probe" in (out / "summary.md").read_text()
    assert (out / "orca.png").stat().st_size > 0


@pytest.mark.parametrize("kept_in, kept_ood, flag", [(1, 1, "--train-problems"), (3, 1, "--pool-problems"), (4, 0, "--ood-problems")])
def test_orca_toy_traces_too_few_kept_name_the_option_to_raise(monkeypatch, kept_in, kept_ood, flag):
    import logging

    import numpy as np

    import orca_experiment
    from jaxsample.errors import ArgumentError

    # Stands in for sampling: only `kept` of the traces take the right option.
    def toy_problems(lm, task_config, rng, key, count, decisions, temperature):
        kept = kept_in if count == 4 else kept_ood
        return np.zeros((kept, 3, 2), np.float32), np.zeros((kept, 3), np.float32), np.ones((kept, 3), bool)

    monkeypatch.setattr(orca_experiment, "toy_problems", toy_problems)
    monkeypatch.setattr(orca_experiment.js, "load", lambda name: None)
    _, config, _ = run.parse(["orca", "--model", "toy-decisions", "--train-problems", "2", "--pool-problems", "2", "--ood-problems", "1"])
    with pytest.raises(ArgumentError, match=f"raise {flag}"):
        orca_experiment.toy_domains(config, logging.getLogger("orca-test"))
