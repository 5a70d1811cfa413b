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
        # 0.1 and 0.10 are the same arm cd_lam0.1_C2: the run would crash on its second record.
        (["codistill", "--lams", "0.1,0.5,0.10"], r"^--lams: 0.1 is repeated in '0.1,0.5,0.10'; give each value once$"),
        (["codistill", "--caps", "2,2.0"], r"^--caps: 2 is repeated"),
        (["grpo", "--model", "sort-small,sort-large,sort-small"], r"^--model: sort-small is repeated"),
        (["grpo", "--beta", "0.1"], r"^--beta 0.1 has no effect with --kl-kind none"),
        (["codistill", "--beta", "0.1"], r"^--beta 0.1 has no effect with --kl-kind none"),
        (["grpo", "--beta", "-0.1", "--kl-kind", "k3_loss"], r"^--beta must be a number in \[0, inf\)"),
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


def test_beta_with_a_kl_estimator_and_the_defaults_pass():
    for args in (["grpo"], ["codistill"], ["grpo", "--beta", "0.1", "--kl-kind", "k3_loss"]):
        command, config, _ = run.parse(args)
        run.COMMANDS[command].check_config(config)


def test_codistill_weights_arm_flags_turn_the_w1_arm_on_and_off():
    import codistill_experiment

    arms = {}
    for flag in ("", "--weights-arm", "--no-weights-arm"):
        _, config, _ = run.parse(["codistill", *([flag] if flag else [])])
        arms[flag] = [name for name, _ in codistill_experiment.arms(config)]
    assert "cd_lam0.1_w1" in arms[""] and arms["--weights-arm"] == arms[""]
    assert arms["--no-weights-arm"] == [name for name in arms[""] if name != "cd_lam0.1_w1"]
