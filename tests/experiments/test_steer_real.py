"""`run.py steer --setting smollm2` (experiments/steer_real.py) end to end on a tiny random
decoder with SmolLM2's tokenizer, and its repetition metric."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import run  # noqa: E402
import steer_experiment  # noqa: E402
import steer_real  # noqa: E402

from jaxsample.errors import ArgumentError  # noqa: E402


def test_distinct_n_counts_repeated_ngrams():
    assert steer_real.distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert steer_real.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert steer_real.distinct_n([[1, 2, 1, 2], [5]], 2) == pytest.approx(2 / 3)  # no bigram: not counted
    assert np.isnan(steer_real.distinct_n([[], [3]], 2))


@pytest.mark.parametrize("flag, value, message", [
    ("--test-prompts", "41", "--test-prompts 41 is more than the 40 neutral openings"),
    ("--setpoint-prompts", "142", "--setpoint-prompts 142 is more than the 141 contrast prompts a side"),
])
def test_prompt_counts_beyond_the_shipped_data_are_refused(flag, value, message):
    _, config, _ = run.parse(["steer", "--setting", "smollm2", flag, value])
    with pytest.raises(ArgumentError, match=message):
        steer_experiment.check_config(config)


def test_unset_prompt_counts_mean_all_shipped_data_in_smollm2_and_the_defaults_in_synthetic():
    _, config, _ = run.parse(["steer", "--setting", "smollm2"])
    steer_experiment.check_config(config)  # the defaults fit the shipped data
    _, config, _ = run.parse(["steer"])
    assert [steer_experiment.synthetic_prompts(config, name) for name in ("setpoint_prompts", "test_prompts")] == [200, 64]


def test_steer_smollm2_setting_runs_every_method_at_matched_control_size(tmp_path, tiny_chat_checkpoint):
    out = tmp_path / "run"
    argv = ["steer", "--setting", "smollm2", "--model", str(tiny_chat_checkpoint), "--lams", "3", "--timing-samples", "0",
            "--setpoint-prompts", "6", "--jacobian-prompts", "2", "--test-prompts", "3", "--samples", "2",
            "--new-tokens", "4", "--actadd-layer", "1", "--setpoint", "centred", "--out", str(out)]
    assert run.main(argv) == 0
    records = {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(records) == {"setup", "none", "lam3"}
    assert records["setup"]["test_prompts"] == 3 and records["setup"]["scorer_accuracy"] > 0.5
    # the centred setpoint puts the two classes at λ = ±1/2 along every block's direction
    np.testing.assert_allclose(records["setup"]["desired_lam"][1:], 0.5, atol=1e-4)
    np.testing.assert_allclose(records["setup"]["undesired_lam"][1:], -0.5, atol=1e-4)
    rows = {row["method"]: row for row in records["lam3"]["rows"]}
    assert set(rows) == set(steer_real.METHODS)
    target = rows["alqr"]["u"]
    assert target > 0
    for method in ("actadd", "mean_difference"):  # open loop: matched exactly
        assert rows[method]["u"] == pytest.approx(target, rel=1e-4)
    for row in [*rows.values(), records["none"]["rows"][0]]:
        assert len(row["texts"]) == 6 and 0 <= row["positive"] <= 1 and row["perplexity"] > 1
    assert "| λ | method |" in (out / "summary.md").read_text() and (out / "steer_smollm2.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # the tiny model has 3 blocks
        run.main([*argv[:-1], str(tmp_path / "bad"), "--actadd-layer", "3"])
    with pytest.raises(SystemExit):
        run.main(["steer", "--setting", "smollm2", "--top-p", "0", "--out", str(tmp_path / "bad2")])


@pytest.mark.parametrize("zero_rows, message", [
    ([0, 1, 2], "E_k are zero at every block: .* raise --setpoint-prompts"),
    ([0, 1], "E_k are zero at every block"),  # the output row alone steers no block
    ([1], r"E_1 is zero, so ActAdd at --actadd-layer 1 has no direction: .* \(0\)"),
])
def test_zero_contrastive_directions_are_refused_before_steering(zero_rows, message):
    # Identical class prompts give E = 0; the mean difference then divided by zero blocks.
    _, config, _ = run.parse(["steer", "--actadd-layer", "1"])
    E = np.ones((3, 4), np.float32)
    E[zero_rows] = 0
    with pytest.raises(ArgumentError, match=message):
        steer_real.check_directions(E, config)
    steer_real.check_directions(np.ones((3, 4), np.float32), config)
