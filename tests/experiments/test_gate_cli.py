"""`experiments/run.py gate`: late-half counts and the annealed classifier schedule's calibration."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsample import safety
from jaxsample.errors import ArgumentError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import gate_experiment  # noqa: E402
import run  # noqa: E402


def test_late_counts_cover_the_second_half_of_the_iterations():
    # one accept per step: the second half of N steps holds N - N // 2 of them
    for steps in (1, 2, 7, 300):
        cumulative = np.tile(np.arange(1, steps + 1), (3, 1))
        assert gate_experiment._late(cumulative) == 3 * (steps - steps // 2)
    # an accept at step N // 2 (the first of the second half) is late; one just before is not
    cumulative = np.zeros((1, 300), int)
    cumulative[0, 150:] = 1
    assert gate_experiment._late(cumulative) == 1
    cumulative = np.zeros((1, 300), int)
    cumulative[0, 149:] = 1
    assert gate_experiment._late(cumulative) == 0


def test_annealed_thresholds_are_calibrated_on_the_fixed_gates_own_proposals():
    problem = safety.controller_problem(jax.random.key(0), 84).problem
    config = {"train_runs": 4, "train_steps": 15, "iterations": 40}
    names = ["logistic_fixed", "logistic_annealed"]
    gates, _, calibration = gate_experiment.classifier_gates(jax.random.key(1), problem, names, config, 1.0)
    assert set(gates) == set(names)
    summary = calibration["logistic_annealed"]
    # calibrated on train_runs runs of the fixed gate, iterations steps each
    assert summary["calibration_proposals"] == 4 * 40
    assert summary["calibration_unsafe"] > 0
    # the fixed gate lets unsafe proposals through along its own runs, so the annealed
    # schedule is strictly tighter than the fixed threshold, and never laxer
    assert summary["calibration_fixed_rate"] > 0
    assert summary["steps_above_fixed"] > 0
    assert 0.5 <= summary["threshold_first"] <= summary["threshold_last"]
    assert summary["threshold_last"] > 0.5


@pytest.mark.parametrize("options,message", [
    # canary_task needs 32 of the p(p − 1) prompts: p = 6 failed after the controller units
    (["--modulus", "6", "--kappas", ""], "--modulus must be 0 (skip the transformer) or >= 7"),
    (["--dims", "", "--modulus", "0"], "--dims is empty and --modulus 0 skips the transformer: nothing to run"),
    (["--dims", "8,16,8"], "--dims: 8 is repeated in '8,16,8'"),
    # units are keyed chain_kappa{k:g}, so 1 and 1.0 (and 1.0000001) are one key
    (["--kappas", "1,2,1.0"], "--kappas: 1 is repeated in '1,2,1.0'"),
    (["--kappas", "1,1.0000001"], "--kappas: 1 is repeated in '1,1.0000001'"),
])
def test_gate_options_that_would_fail_mid_run_are_refused_up_front(options, message):
    _, config, _ = run.parse(["gate", *options])
    with pytest.raises(ArgumentError) as error:
        gate_experiment.check_config(config)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("options", [["--modulus", "7", "--kappas", ""], ["--dims", "", "--modulus", "7", "--kappas", ""],
                                     ["--dims", "8", "--modulus", "0"], ["--kappas", "1,1.5"]])
def test_gate_accepts_the_smallest_modulus_and_either_problem_alone(options):
    _, config, _ = run.parse(["gate", *options])
    gate_experiment.check_config(config)
