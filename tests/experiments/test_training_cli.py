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


def test_sorting_held_out_problems_are_never_training_prompts():
    from training_runs import sorting_held_out, sorting_prompts

    for seed in range(3):
        held_out = {tuple(p.prompt) for p in sorting_held_out(seed, 128)}
        prompt_fn = sorting_prompts(seed, 16)
        trained = {tuple(prompt) for t in range(40) for prompt in prompt_fn(t)[0]}
        assert len(held_out) > 100 and not held_out & trained
