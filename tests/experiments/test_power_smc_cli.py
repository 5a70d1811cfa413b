"""`experiments/run.py power` and `smc`: options refused before any result is written."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import run  # noqa: E402

from jaxsample.errors import ArgumentError  # noqa: E402


@pytest.mark.parametrize("command", ["power", "smc"])
def test_a_repeated_decision_count_is_refused(command):
    # 1 and 01 are the same K: both would write the units K1-0/...
    _, config, _ = run.parse([command, "--decisions", "1,2,01"])
    with pytest.raises(ArgumentError, match=r"^--decisions: 1 is repeated in '1,2,01'; give each value once$"):
        run.COMMANDS[command].check_config(config)


@pytest.mark.parametrize("command", ["power", "smc"])
def test_max_new_tokens_beyond_the_models_positions_is_refused_before_the_first_unit(command, tmp_path, capsys):
    # the exact data model has 82 positions and K = 1 prompts of 42 tokens; the samplers
    # noticed only in the first sampling unit, after the exact reference was written
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run.main([command, "--model", "exact", "--decisions", "1", "--problems-per-k", "1",
                  "--max-new-tokens", "41", "--methods", "base", "--out", str(out)])
    assert stop.value.code == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: --max-new-tokens 41: problem K1-0's prompt of 42 tokens + 41 new tokens exceeds the 82 positions")
    assert error.endswith("give --max-new-tokens 40 or less")
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").read_text() == ""
