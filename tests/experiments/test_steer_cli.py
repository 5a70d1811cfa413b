"""`run.py steer` (synthetic setting) end to end on a tiny configuration."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import run  # noqa: E402

TINY = ["steer", "--vocab", "8", "--layers", "2", "--width", "16", "--sequence-length", "10", "--prompt-length", "4",
        "--new-tokens", "5", "--train-steps", "30", "--train-batch", "16", "--setpoint-prompts", "8",
        "--jacobian-prompts", "4", "--test-prompts", "4", "--lams", "1"]


def test_steer_command_compares_every_method_at_matched_control_size(tmp_path):
    out = tmp_path / "steer"
    assert run.main([*TINY, "--out", str(out)]) == 0
    records = {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(records) == {"setup", "lam1"}
    assert len(records["setup"]["linearisation_local"]) == 2
    rows = {row["method"]: row for row in records["lam1"]["rows"]}
    assert set(rows) == {"none", "alqr", "spid", "actadd", "mean_difference"}
    assert rows["none"]["u"] == 0 and rows["alqr"]["u"] > 0
    for method in ("actadd", "mean_difference"):  # open loop: Σ_k ‖u_k‖ is the coefficient exactly
        np.testing.assert_allclose(rows[method]["u"], rows["alqr"]["u"], rtol=1e-4)
    for row in rows.values():
        assert len(row["tracking0_mean"]) == 3 and 0 <= row["attribute0"] <= 1 and row["nll1"] > 0
        # x_0 is the embedding: no method can move it
        np.testing.assert_allclose(row["tracking0_mean"][0], rows["none"]["tracking0_mean"][0], atol=1e-5)
    assert "| λ | method |" in (out / "summary.md").read_text()
    assert (out / "steer.png").stat().st_size > 0
    # a resumed run reloads the cached model and redoes nothing
    assert run.main(["steer", "--out", str(out), "--resume"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_steer_command_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.main([*TINY, "--lams", "1,x", "--out", str(tmp_path / "bad")])
    assert "--lams must be comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main([*TINY, "--prompt-length", "8", "--out", str(tmp_path / "bad")])
    assert "must fit the model's --sequence-length" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main([*TINY, "--test-prompts", "1", "--out", str(tmp_path / "bad")])
    assert "--test-prompts must be at least 2" in capsys.readouterr().err


def test_steer_refuses_a_repeated_lam():
    from jaxsample.errors import ArgumentError

    import steer_experiment

    # 1 and 1.0 are the same unit lam1: the run would crash on its second record.
    _, config, _ = run.parse([*TINY, "--lams", "0.5,1,1.0"])
    with pytest.raises(ArgumentError, match=r"^--lams: 1 is repeated in '0.5,1,1.0'; give each value once$"):
        steer_experiment.check_config(config)
