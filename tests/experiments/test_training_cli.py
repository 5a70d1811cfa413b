"""`run.py grpo` / `run.py codistill`: bad options are refused by `check_config` before any training."""

import sys
from pathlib import Path

import pytest

from jaxsample.errors import ArgumentError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import run  # noqa: E402


@pytest.mark.parametrize(
    "args, message",
    [
        (["grpo", "--group-size", "1"], "--group-size"),
        (["grpo", "--task", "arithmetic"], "--task arithmetic"),
        (["grpo", "--model", "sort-huge"], "--task sorting"),
        (["grpo", "--lora-rank", "8"], "--lora-rank 8 applies to --task arithmetic only"),
        (["codistill", "--lams", "0.1,x"], "--lams"),
        (["codistill", "--caps", "0"], "--caps"),
        (["codistill", "--steps", "0"], "--steps"),
    ],
)
def test_bad_training_options_are_refused(args, message):
    command, config, _ = run.parse(args)
    with pytest.raises(ArgumentError, match=message):
        run.COMMANDS[command].check_config(config)
