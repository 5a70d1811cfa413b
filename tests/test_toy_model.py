"""The shipped embedded model `toy-decisions`: loadable, faithful to the task, and showing the
phenomenon the samplers exist for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import tasks
from jaxsample.models.registry import resolve

ALPHA = 4.0


@pytest.fixture(scope="module")
def lm():
    return js.load("toy-decisions")


@pytest.fixture(scope="module")
def task():
    return tasks.read_task_config(resolve("toy-decisions"))


def test_checkpoint_is_small_and_loads_in_transformers(lm, task):
    import torch
    from transformers import AutoModelForCausalLM

    directory = resolve("toy-decisions")
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    assert size <= 5 * 2**20, f"shipped checkpoint is {size} bytes"
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(reference).__name__ == "Qwen2ForCausalLM"
    problem = tasks.sample_problem(0, task, 2)
    tokens = np.concatenate([problem.prompt, problem.correct_trace])[None]
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(lm.logits(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("num_decisions", [1, 2, 3, 4])
def test_power_distribution_beats_base_and_temperature_by_20_points(lm, task, num_decisions):
    rng = np.random.default_rng(100 + num_decisions)
    for _ in range(3):
        problem = tasks.sample_problem(rng, task, num_decisions)
        acc = tasks.exact_accuracies(lm, problem, ALPHA)
        # The lower end of the bracket: p^α is at least this good.
        power = acc.power_lower_bound
        assert power - max(acc.base, acc.temperature) >= 0.20, acc


def test_sampled_accuracy_matches_the_models_exact_base_accuracy(lm, task):
    problem = tasks.sample_problem(np.random.default_rng(5), task, 1)
    samples = 2000
    out = js.generate(jax.random.key(0), lm, jnp.asarray(problem.prompt), task.trace_length(1),
                      num_samples=samples)
    measured = np.mean(tasks.grade(problem, np.asarray(out.tokens)))
    exact = tasks.exact_accuracies(lm, problem, ALPHA).base
    # 5 binomial standard errors: a false alarm below 1e-6.
    assert abs(measured - exact) <= 5 * np.sqrt(exact * (1 - exact) / samples)


def test_largest_entropy_jump_falls_on_a_decision(lm, task):
    rng = np.random.default_rng(11)
    hits = total = 0
    for num_decisions in (1, 2, 3, 4):
        problem = tasks.sample_problem(rng, task, num_decisions)
        out = js.generate(jax.random.key(num_decisions), lm, jnp.asarray(problem.prompt),
                          task.trace_length(num_decisions), num_samples=50)
        for row in range(50):
            n = int(out.lengths[row])
            entropy = np.asarray(out.entropy[row, :n])
            jumps = entropy - np.concatenate([[0.0], entropy[:-1]])
            decisions = tasks.decision_positions(problem, np.asarray(out.tokens[row, :n]))
            hits += int(np.argmax(jumps) in set(decisions.tolist()))
            total += 1
    assert hits / total >= 0.90, f"hit rate {hits / total:.3f}"
