"""`run.py route` and `run.py causalrm` end to end on tiny configurations."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import run  # noqa: E402


def test_route_command_reports_every_method_and_allocation(tmp_path):
    out = tmp_path / "route"
    argv = ["route", "--batches", "1", "--validation-batches", "1", "--batch-size", "20",
            "--conditions", "random", "--gpus", "8", "--out", str(out)]
    assert run.main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    conditions = [r for r in records if r["key"] != "allocation"]
    assert len(conditions) == 4  # random × {tight, loose} × {homogeneous, biased}
    for record in conditions:
        rows = {row["method"]: row for row in record["rows"]}
        assert set(rows) == {"milp", "box", "budgeted", "ellipsoidal", "per_query_raw", "per_query_repaired"}
        for method in ("milp", "box", "budgeted", "ellipsoidal", "per_query_repaired"):
            assert rows[method]["violation_rate"] == 0.0
    allocation = next(r for r in records if r["key"] == "allocation")
    assert {row["method"] for row in allocation["rows"]} == {"optimised", "uniform"}
    assert "| condition | method |" in (out / "summary.md").read_text()
    assert (out / "routing.png").stat().st_size > 0


def test_causalrm_command_on_synthetic_features(tmp_path):
    out = tmp_path / "causalrm"
    argv = ["causalrm", "--model", "synthetic", "--seeds", "1", "--replicates", "2", "--steps", "50", "--out", str(out)]
    assert run.main(argv) == 0
    (line,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in line["records"]] == ["naive", "noise_only", "ips_only", "ips_noise", "dr", "oracle"]
    assert all(0 <= r["ece"] <= 1 and 0 <= r["auroc"] <= 1 for r in line["records"])
    assert (out / "causalrm.png").stat().st_size > 0
    assert "oracle" in (out / "summary.md").read_text()
