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


import numpy as np  # noqa: E402
import pytest  # noqa: E402

import route_experiment  # noqa: E402

from jaxsample.errors import ArgumentError  # noqa: E402


@pytest.mark.parametrize("options,message", [
    (["--conditions", "random,sorted,random"], "--conditions: random is repeated in 'random,sorted,random'"),
    # the tight capacities 60/40/25/10 % of 3 queries are [1, 1, 0, 0]
    (["--batch-size", "3"], "--batch-size 3: the tight capacities [1, 1, 0, 0] cannot serve a batch of 3 queries"),
    # an instance serves 10 // 4 = 2 queries, so 4 GPUs serve 8 of 10: allocate_instances
    # found nothing, after every condition had been written
    (["--batch-size", "10", "--gpus", "4"], "--gpus 4: no allocation of 4 GPUs serves a batch of 10 queries"),
])
def test_route_options_that_would_fail_mid_run_are_refused_up_front(options, message):
    _, config, _ = run.parse(["route", *options])
    with pytest.raises(ArgumentError) as error:
        route_experiment.check_config(config)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("batch_size,gpus", [(4, 4), (10, 5), (100, 4), (100, 16)])
def test_route_accepts_the_fewest_gpus_that_serve_a_batch(batch_size, gpus):
    _, config, _ = run.parse(["route", "--batch-size", str(batch_size), "--gpus", str(gpus)])
    route_experiment.check_config(config)


@pytest.mark.parametrize("kind", ["random", "sorted"])
@pytest.mark.parametrize("batches,validation", [(6, 2), (12, 3)])
def test_route_batches_disjoint_and_sorted_spans_the_pool(monkeypatch, kind, batches, validation):
    pools = []
    make_pool = route_experiment.make_pool
    monkeypatch.setattr(route_experiment, "make_pool", lambda *a, **k: pools.append(make_pool(*a, **k)) or pools[-1])
    config = {"batch_size": 10, "batches": batches, "validation_batches": validation, "nu": 0.15}
    val, test = route_experiment.condition_data(3, kind, "homogeneous", config)
    assert (len(val), len(test)) == (validation, batches)
    assert all(len(b["difficulty"]) == 10 for b in val + test)
    (pool,) = pools
    rank = {d: r for r, d in enumerate(np.sort(pool["difficulty"]))}  # difficulties are distinct floats
    val_ids = {d for b in val for d in b["difficulty"]}
    test_ids = {d for b in test for d in b["difficulty"]}
    assert len(val_ids) == 10 * validation and len(test_ids) == 10 * batches  # no repeats within a split
    assert not val_ids & test_ids  # tuning never sees a test query
    if kind == "sorted":
        size = len(pool["difficulty"])
        for b in val + test:  # each batch is a consecutive slice of the sorted pool
            ranks = sorted(rank[d] for d in b["difficulty"])
            assert ranks == list(range(ranks[0], ranks[0] + 10)) and ranks[0] % 10 == 0
        # the test batches reach both ends: the easiest and the hardest slice of the pool
        assert min(rank[d] for d in test_ids) == 0 and max(rank[d] for d in test_ids) == size - 1
        assert max(rank[d] for d in val_ids) >= 0.7 * size and min(rank[d] for d in val_ids) < 0.4 * size


def test_causalrm_command_on_synthetic_features(tmp_path):
    out = tmp_path / "causalrm"
    argv = ["causalrm", "--model", "synthetic", "--seeds", "1", "--replicates", "2", "--steps", "50", "--out", str(out)]
    assert run.main(argv) == 0
    (line,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in line["records"]] == ["naive", "noise_only", "ips_only", "ips_noise", "dr", "oracle"]
    assert all(0 <= r["ece"] <= 1 and 0 <= r["auroc"] <= 1 for r in line["records"])
    assert (out / "causalrm.png").stat().st_size > 0
    assert "oracle" in (out / "summary.md").read_text()
