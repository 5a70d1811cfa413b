"""`run.py twisted --model toy-diffusion` end to end at the smallest size."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import run  # noqa: E402


def test_twisted_on_toy_diffusion_runs(tmp_path):
    out = tmp_path / "run"
    status = run.main(["twisted", "--model", "toy-diffusion", "--iterations", "1", "--eval-runs", "2",
                       "--particles", "4", "--learning-rates", "0.03", "--fit-steps", "2", "--out", str(out)])
    assert status in (0, None)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({r["method"] for r in records}) == ["tri", "untwisted"]  # CTL is not built for diffusion
    assert all(np.isfinite(r["log_z_mean"]) and 0 <= r["accuracy"] <= 1 for r in records)
    assert [r["iteration"] for r in records if r["method"] == "tri"] == [0, 1]
    # The unmasking path has no early stop: N·T tokens per run, and per SIS pass of learning.
    assert all(r["tokens"] == 4 * 8 for r in records)
    assert [r.get("learning_tokens") for r in records if r["method"] == "tri"] == [None, 4 * 8]
    assert all(r["accuracy_se"] >= 0 and r["log_z_se"] >= 0 and r["log_z_var_se"] >= 0 for r in records)
    summary = (out / "summary.md").read_text()
    assert "b̂" in summary and "±" in summary and (out / "twisted_learning.png").is_file()


@pytest.mark.parametrize("methods", ["ctl", "untwisted,ctl"])
def test_toy_diffusion_refuses_ctl_before_the_run_starts(tmp_path, capsys, methods):
    # ctl used to be dropped silently: alone, the run crashed plotting nothing and left files behind.
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run.main(["twisted", "--model", "toy-diffusion", "--methods", methods, "--out", str(out)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --methods: ctl ") and error.count("\n") == 1
    assert "untwisted, tri" in error
    assert not out.exists()
