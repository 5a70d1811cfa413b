"""`run.py grpo` / `run.py codistill`: bad options are one-line errors before any training."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["grpo", "--group-size", "1"], "--group-size"),
        (["grpo", "--task", "arithmetic"], "--task arithmetic"),
        (["codistill", "--lams", "0.1,x"], "--lams"),
    ],
)
def test_bad_training_options_are_one_line_errors(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run.py"), *args, "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
