"""`experiments/run.py gate`: late-half counts and the annealed classifier schedule's calibration."""

import sys
from pathlib import Path

import jax
import numpy as np

from jaxsample import safety

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import gate_experiment  # noqa: E402


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
